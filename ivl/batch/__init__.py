"""Batch inference over a dataset of prompts on Ray Data (``ivl batch``).

Public names: :func:`run_batch`, :class:`BatchSummary`, :func:`row_seed`, :func:`read_rows`.
See docs/scaling.md.
"""

from __future__ import annotations

from ivl.batch.io import read_rows, row_seed
from ivl.batch.pipeline import BatchSummary, run_batch

__all__ = ["BatchSummary", "read_rows", "row_seed", "run_batch"]
