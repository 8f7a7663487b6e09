"""ivl: transferable post-training via Inverse Value Learning.

Train a small value network against a frozen base model, then add its logits to any other base
model at inference (bigger, continually pre-trained, or of another family through a vocabulary
map).
"""

from __future__ import annotations

from ivl.ops import INVALID_TOKEN, merge_logits, merge_sample, merged_log_softmax

__version__ = "0.1.0"

__all__ = ["INVALID_TOKEN", "__version__", "merge_logits", "merge_sample", "merged_log_softmax"]
