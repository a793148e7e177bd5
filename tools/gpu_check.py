#!/usr/bin/env python
"""The command of detr_irpe/cli/gpu_check.py (installed as detr-irpe-gpu-check); --help says what it does."""
import os
import sys

# A bare GPU machine runs this from the checkout with nothing installed: the checkout's packages come first.
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from detr_irpe.cli.gpu_check import main  # noqa: E402

main()
