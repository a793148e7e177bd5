#!/usr/bin/env python
"""The command of detr_irpe/cli/benchmark.py (installed as detr-irpe-benchmark); --help says what it does."""
from detr_irpe.cli.benchmark import main

main()
