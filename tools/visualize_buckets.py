#!/usr/bin/env python
"""The command of detr_irpe/cli/visualize_buckets.py (installed as detr-irpe-visualize-buckets); --help says what it does."""
from detr_irpe.cli.visualize_buckets import main

main()
