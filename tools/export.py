#!/usr/bin/env python
"""The command of detr_irpe/cli/export.py (installed as detr-irpe-export); --help says what it does."""
from detr_irpe.cli.export import main

main()
