"""Generation engine: a base LM + a value network with paired KV caches and continuous batching.

Public names: :class:`IVLModel`, :class:`IVLEngine`, :class:`SamplingParams`, :class:`Result`,
:class:`StreamEvent`. See docs/engine.md for the design.
"""

from __future__ import annotations

from ivl.engine.engine import IVLEngine
from ivl.engine.model import IVLModel
from ivl.engine.params import Result, SamplingParams, StreamEvent

__all__ = ["IVLEngine", "IVLModel", "Result", "SamplingParams", "StreamEvent"]
