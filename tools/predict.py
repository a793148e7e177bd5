#!/usr/bin/env python
"""The command of detr_irpe/cli/predict.py (installed as detr-irpe-predict); --help says what it does."""
from detr_irpe.cli.predict import main

main()
