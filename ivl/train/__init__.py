"""Value-network training (METHOD.md sections 2 and 3): data, merged loss, trainer.

``train_value(base, value_init, data, config) -> Path`` and :class:`TrainConfig` are the entry
points; :func:`merged_loss` is the chunked loss. Names are imported lazily (torch on first use).
"""

from __future__ import annotations

from ivl._lazy import lazy_getattr

_LAZY = {
    "TrainConfig": "ivl.train.trainer",
    "train_value": "ivl.train.trainer",
    "merged_loss": "ivl.train.loss",
    "naive_merged_loss": "ivl.train.loss",
    "load_examples": "ivl.train.data",
    "read_ivl_json": "ivl.train.artefact",
}

__all__ = sorted(_LAZY)


__getattr__ = lazy_getattr(globals(), _LAZY)
