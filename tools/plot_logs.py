#!/usr/bin/env python
"""The command of detr_irpe/cli/plot_logs.py (installed as detr-irpe-plot-logs); --help says what it does."""
from detr_irpe.cli.plot_logs import main

main()
