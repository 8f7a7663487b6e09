"""ivl: transferable post-training via Inverse Value Learning.

Train a small value network against a frozen base model, then add its logits to any other base
model at inference (bigger, continually pre-trained, or of another family through a vocabulary
map).

Public names are imported lazily so that ``import ivl`` (and the ``ivl`` command's ``--help``)
does not pay for torch until an op is used.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from ivl._lazy import lazy_getattr

__version__ = "0.1.0"

# public name -> module that defines it
_LAZY = {
    "INVALID_TOKEN": "ivl.ops",
    "IVLEngine": "ivl.engine",
    "IVLForCausalLM": "ivl.engine.causal_lm",
    "IVLLogitsProcessor": "ivl.engine.hf",
    "IVLModel": "ivl.engine",
    "SamplingParams": "ivl.engine",
    "TrainConfig": "ivl.train.trainer",
    "VocabMap": "ivl.vocab",
    "merge_logits": "ivl.ops",
    "merge_sample": "ivl.ops",
    "merged_log_softmax": "ivl.ops",
    "train_value": "ivl.train.trainer",
    "zoo": "ivl.models.zoo",
}

__all__ = [
    "INVALID_TOKEN",
    "IVLEngine",
    "IVLForCausalLM",
    "IVLLogitsProcessor",
    "IVLModel",
    "SamplingParams",
    "TrainConfig",
    "VocabMap",
    "__version__",
    "merge_logits",
    "merge_sample",
    "merged_log_softmax",
    "train_value",
    "zoo",
]

if TYPE_CHECKING:
    from ivl.engine import IVLEngine, IVLModel, SamplingParams
    from ivl.engine.causal_lm import IVLForCausalLM
    from ivl.engine.hf import IVLLogitsProcessor
    from ivl.models import zoo
    from ivl.ops import INVALID_TOKEN, merge_logits, merge_sample, merged_log_softmax
    from ivl.train.trainer import TrainConfig, train_value
    from ivl.vocab import VocabMap


__getattr__ = lazy_getattr(globals(), _LAZY, frozenset({"zoo"}))
