#!/usr/bin/env python
"""The command of detr_irpe/cli/visualize_rpe.py (installed as detr-irpe-visualize-rpe); --help says what it does."""
from detr_irpe.cli.visualize_rpe import main

main()
