#!/usr/bin/env python
"""The command of detr_irpe/cli/benchmark_op.py (installed as detr-irpe-benchmark-op); --help says what it does."""
from detr_irpe.cli.benchmark_op import main

main()
