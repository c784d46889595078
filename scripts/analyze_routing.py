#!/usr/bin/env python
"""Routing analysis of a trained MoEC checkpoint (same as ``python -m fairseq_moec.analyze``).

    python scripts/analyze_routing.py CHECKPOINT DATA_BIN --split valid --out DIR [--max-sentences 1000]
"""
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # the repository root

from fairseq_moec.analyze import cli_main  # noqa: E402

if __name__ == "__main__":
    cli_main()
