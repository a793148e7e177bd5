#!/usr/bin/env python
"""The command of detr_irpe/cli/pretrain_backbone.py (installed as detr-irpe-pretrain-backbone); --help says what it does."""
from detr_irpe.cli.pretrain_backbone import main

main()
