"""Evaluation: held-out GSM-Symbolic accuracy, teacher-forced NLL, JSONL tasks, baselines,
experiment suites and reports (see docs/eval.md).

Names are imported lazily (torch on first use). The lm-eval adapter lives in
:mod:`ivl.eval.lm_harness` (importing it registers ``--model ivl``).
"""

from __future__ import annotations

import importlib
from typing import Any

_LAZY = {
    "ModelSpec": "ivl.eval.harness",
    "NLLResult": "ivl.eval.harness",
    "GenEval": "ivl.eval.harness",
    "sequence_logprobs": "ivl.eval.harness",
    "nll": "ivl.eval.harness",
    "generate_eval": "ivl.eval.harness",
    "gsm_problems": "ivl.eval.harness",
    "gsm_accuracy": "ivl.eval.harness",
    "read_items": "ivl.eval.harness",
    "extract_answer": "ivl.eval.metrics",
    "wilson_interval": "ivl.eval.metrics",
    "exact_match": "ivl.eval.metrics",
    "numeric_match": "ivl.eval.metrics",
    "finetune": "ivl.eval.finetune",
    "run_suite": "ivl.eval.suite",
    "load_suite": "ivl.eval.suite",
    "write_report": "ivl.eval.report",
}

__all__ = sorted(_LAZY)


def __getattr__(name: str) -> Any:
    if name not in _LAZY:
        raise AttributeError(f"module 'ivl.eval' has no attribute {name!r}")
    value = getattr(importlib.import_module(_LAZY[name]), name)
    globals()[name] = value
    return value
