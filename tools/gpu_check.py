#!/usr/bin/env python
"""The command of detr_irpe/cli/gpu_check.py (installed as detr-irpe-gpu-check); --help says what it does."""
from detr_irpe.cli.gpu_check import main

main()
