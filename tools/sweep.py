#!/usr/bin/env python
"""The command of detr_irpe/cli/sweep.py (installed as detr-irpe-sweep); --help says what it does."""
from detr_irpe.cli.sweep import main

main()
