#!/usr/bin/env python
"""The command of detr_irpe/cli/train.py (installed as detr-irpe-train); --help says what it does."""
from detr_irpe.cli.train import main

main()
