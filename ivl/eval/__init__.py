"""Evaluation: held-out GSM-Symbolic accuracy, teacher-forced NLL, JSONL tasks, baselines,
experiment suites and reports (see docs/eval.md).

Names are imported lazily (torch on first use). The lm-eval adapter lives in
:mod:`ivl.eval.lm_harness` (importing it registers ``--model ivl``).
"""

from __future__ import annotations

from ivl._lazy import lazy_getattr

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


__getattr__ = lazy_getattr(globals(), _LAZY)
