"""Vocabulary maps between a base and a value tokenizer (METHOD.md section 4).

:class:`VocabMap` holds, per base token, the value-vocabulary column it reads and a weight;
build it with :func:`build_map` (kinds ``exact``, ``dtw``, ``padded``, ``auto``), save/load it
as safetensors + JSON, and check its coverage with :func:`coverage`. The engine's re-tokenization
bridge (ivl.engine.bridge) lets a value model with another tokenizer follow the base's text.
See docs/vocab.md.
"""

from __future__ import annotations

from ivl.vocab.map import KINDS, VocabMap, build_map

__all__ = ["KINDS", "VocabMap", "build_map"]
