"""Generation engine: a base LM + a value network with paired KV caches and continuous batching.

Public names: :class:`IVLModel`, :class:`IVLEngine`, :class:`SamplingParams`, :class:`Result`,
:class:`StreamEvent`, and (imported on first use) :class:`IVLForCausalLM`. See docs/engine.md
for the design.
"""

from __future__ import annotations

from ivl.engine.engine import IVLEngine
from ivl.engine.model import IVLModel
from ivl.engine.params import Result, SamplingParams, StreamEvent

__all__ = ["IVLEngine", "IVLForCausalLM", "IVLModel", "Result", "SamplingParams", "StreamEvent"]


def __getattr__(name: str):
    if name == "IVLForCausalLM":  # lazy: builds a PreTrainedModel subclass on import
        from ivl.engine.causal_lm import IVLForCausalLM

        return IVLForCausalLM
    raise AttributeError(f"module 'ivl.engine' has no attribute {name!r}")
