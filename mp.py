#!/usr/bin/env python3
"""Start, stop or show a cw master and workers on this machine: ``./mp.py -n N start|stop|status``.

A thin wrapper around ``cw.mp.main`` that works from a clone (no install needed).
"""
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from cw.mp import main

if __name__ == "__main__":
    sys.exit(main())
