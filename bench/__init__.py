"""Benchmarks of dynaconnd and its client against their baselines.

``python -m bench`` (``make bench``) runs every comparison side by side
in one run, prints one table and writes it to BENCHMARKS.md.
"""

from __future__ import annotations
