#!/usr/bin/env python
"""The command of detr_irpe/cli/eval.py (installed as detr-irpe-eval); --help says what it does."""
from detr_irpe.cli.eval import main

main()
