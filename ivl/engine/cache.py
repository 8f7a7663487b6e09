"""Slot KV caches: one fixed buffer per model, shared slots and positions across models.

Layout (per model, per attention layer)::

    keys, values: [max_batch, kv_heads, max_len + 1, head_dim]   allocated once (first forward;
                                                                 the last column is scratch)

Slot ``s`` holds one request; its token at position ``p`` lives in column ``p`` (column index ==
RoPE position, so no padding and no compaction along the sequence axis is ever needed). The
active requests always occupy slots ``0 .. n-1``: when one finishes, the request in the last
slot is moved into the hole (one copy of its K/V rows, once per finished request), so a decode
step runs on plain views ``keys[:n, :, :K]`` with no gather.

The transformers model talks to a :class:`SlotCache` (a ``transformers.Cache``) whose
``update`` writes where the current *plan* says:

- prefill (one request, alone): columns ``[start, start + L)`` of slot ``s``; returns that
  slot's columns ``[0, start + L)``;
- decode (rows ``0 .. n-1``, one new token each): column ``pos[r]`` of row ``r``; returns
  ``[:n, :, :K]`` with ``K = max(pos) + 1``.

We always pass explicit ``position_ids`` and ready-made 4-D attention masks (a dict per layer
type for models with sliding-window layers, e.g. Gemma3), so transformers never asks the cache
for a sequence length. Sliding-window layers keep every column and apply the window in the mask:
simple and exact, at the price of full-length memory for those layers.

:class:`PairedKVCache` is the manager: it owns one ``SlotCache`` per model (base, value, and
for proxy-tuning expert / anti-expert), the per-slot lengths, and the masks, and it moves rows
between slots in all caches at once, so a request occupies the same slot and positions in every
model.

A value model with another tokenizer (the cross-vocabulary bridge, ivl.engine.bridge) reads the
same text in its own tokens, so its positions differ from the base's: such a model is *unaligned*
and keeps its own per-slot lengths. Rolling it back is :meth:`PairedKVCache.crop` (a length
change: stale columns are overwritten by the next writes and never attended to before that), and
:meth:`PairedKVCache.extend` feeds a different number of new tokens to each row in one forward
(rows padded to the longest; padded queries repeat the row's last real position and write their
K/V into a scratch column past the usable ones, which no real query can see).
"""

from __future__ import annotations

import functools
import logging
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from transformers.cache_utils import Cache, CacheLayerMixin

from ivl.engine.concurrent import ForwardPool, with_narrow_linears

logger = logging.getLogger("ivl")


@dataclass
class _Plan:
    mode: str = "idle"  # "prefill" | "decode"
    slot: int = 0
    start: int = 0
    n: int = 0
    pos: torch.Tensor | None = None  # [n] int64 (decode); [n, K] write columns (extend)
    kv_len: int = 0
    row0: int = 0  # extend: the rows are row0 .. row0 + n - 1


class _SlotLayer(CacheLayerMixin):
    is_sliding = False
    is_compileable = False
    is_croppable = False

    def __init__(self, plan: _Plan, max_batch: int, max_len: int):
        super().__init__()
        self.plan = plan
        self.max_batch = max_batch
        self.max_len = max_len

    def lazy_initialization(self, key_states: torch.Tensor, value_states: torch.Tensor) -> None:
        self.device = key_states.device
        b, h = self.max_batch, key_states.shape[1]
        self.keys = key_states.new_zeros((b, h, self.max_len, key_states.shape[-1]))
        self.values = value_states.new_zeros((b, h, self.max_len, value_states.shape[-1]))
        self.is_initialized = True

    def update(self, key_states, value_states, *args, **kwargs):
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        p = self.plan
        if p.mode == "prefill":
            end = p.start + key_states.shape[2]
            self.keys[p.slot, :, p.start : end] = key_states[0]
            self.values[p.slot, :, p.start : end] = value_states[0]
            return self.keys[p.slot : p.slot + 1, :, :end], self.values[
                p.slot : p.slot + 1, :, :end
            ]
        if p.mode == "decode":
            rows = torch.arange(p.n, device=self.device)
            self.keys[rows, :, p.pos] = key_states[:, :, 0]
            self.values[rows, :, p.pos] = value_states[:, :, 0]
            return self.keys[: p.n, :, : p.kv_len], self.values[: p.n, :, : p.kv_len]
        if p.mode == "extend":
            rows = torch.arange(p.row0, p.row0 + p.n, device=self.device)[:, None]  # [n, 1]
            # keys[rows, :, pos] is [n, K, heads, dim]; the new states are [n, heads, K, dim]
            self.keys[rows, :, p.pos] = key_states.transpose(1, 2)
            self.values[rows, :, p.pos] = value_states.transpose(1, 2)
            end = p.row0 + p.n
            return self.keys[p.row0 : end, :, : p.kv_len], self.values[p.row0 : end, :, : p.kv_len]
        raise RuntimeError("SlotCache used outside PairedKVCache.prefill/decode")

    def get_mask_sizes(self, query_length: int) -> tuple[int, int]:
        return self.plan.kv_len, 0

    def get_seq_length(self) -> int:
        return self.plan.kv_len

    def get_max_length(self) -> int:
        return self.max_len

    def move_row(self, src: int, dst: int, length: int) -> None:
        if self.is_initialized and length > 0:
            self.keys[dst, :, :length] = self.keys[src, :, :length]
            self.values[dst, :, :length] = self.values[src, :, :length]


class SlotCache(Cache):
    """A ``transformers.Cache`` over fixed [max_batch, kv_heads, max_len, head_dim] buffers."""

    def __init__(self, num_layers: int, plan: _Plan, max_batch: int, max_len: int):
        super().__init__(layers=[_SlotLayer(plan, max_batch, max_len) for _ in range(num_layers)])

    def nbytes(self) -> int:
        return sum(
            layer.keys.nbytes + layer.values.nbytes for layer in self.layers if layer.is_initialized
        )


_SUPPORTED_LAYER_TYPES = ("full_attention", "sliding_attention")


def _num_layers(model) -> int:
    cfg = model.config.get_text_config() if hasattr(model.config, "get_text_config") else None
    return int((cfg or model.config).num_hidden_layers)


def _layer_types(model) -> tuple[str, ...] | None:
    types = getattr(model.config, "layer_types", None)
    if not types:
        return None
    bad = sorted(set(types) - set(_SUPPORTED_LAYER_TYPES))
    if bad:
        raise ValueError(
            f"{type(model).__name__} has layer types {bad}; the ivl engine supports "
            f"{', '.join(_SUPPORTED_LAYER_TYPES)} attention layers only"
        )
    return tuple(types)


def check_attention_impl(model) -> None:
    """The engine builds explicit masks for the sdpa and eager attention implementations."""
    impl = getattr(model.config, "_attn_implementation", None) or "eager"
    if impl not in ("sdpa", "eager"):
        if hasattr(model, "set_attn_implementation"):
            logger.info("switching %s from %s to sdpa attention", type(model).__name__, impl)
            model.set_attn_implementation("sdpa")
        else:
            raise ValueError(
                f"attention implementation {impl!r} is not supported by the ivl engine; load "
                "the model with attn_implementation='sdpa'"
            )


class PairedKVCache:
    """Owns every model's slot cache; slot- and position-aligned across models.

    Parameters
    ----------
    models : dict name -> causal LM
        The models that share slots (e.g. ``{"base": ..., "value": ...}``).
    max_batch : int
        Number of slots (concurrent requests).
    max_len : int
        Columns per slot: a request's prompt + generated tokens (minus the last) must fit.
    unaligned : dict name -> columns, optional
        Models that keep their own per-slot lengths (a value model reading another
        tokenization), with their usable columns per slot.
    """

    def __init__(self, models: dict, max_batch: int, max_len: int, unaligned: dict | None = None):
        if max_batch < 1 or max_len < 1:
            raise ValueError(f"max_batch and max_len must be >= 1, got {max_batch}, {max_len}")
        self.models = dict(models)
        self.max_batch, self.max_len = max_batch, max_len
        self._plan = _Plan()
        unaligned = dict(unaligned or {})
        self.columns = {name: int(unaligned.get(name, max_len)) for name in self.models}
        self.caches = {
            # one scratch column past the usable ones: padded queries of a batched
            # prefill / extend write their K/V there (see _padded_forward)
            name: SlotCache(_num_layers(m), self._plan, max_batch, self.columns[name] + 1)
            for name, m in self.models.items()
        }
        # per-slot lengths of the unaligned models (the others share ``lengths``)
        self.own_lengths = {name: [0] * max_batch for name in unaligned}
        self._types = {name: _layer_types(m) for name, m in self.models.items()}
        for m in self.models.values():
            check_attention_impl(m)
        self.lengths = [0] * max_batch  # tokens cached per slot (== next position)
        # run forwards inside concurrent.narrow_linears (the engine's choice on the CPU, where
        # it routes its models' linears)
        self.narrow_linears = False

    # ---- masks --------------------------------------------------------------------------
    def _mask(self, name: str, q_pos: torch.Tensor, kv_len: int, dtype: torch.dtype):
        """4-D masks [rows, 1, q, kv_len] for ``name`` (dict per layer type when it has types).

        q_pos: int64 [rows, q], the position of each query; key column c is visible when
        c <= q_pos (and q_pos - c < window on sliding layers).
        """
        model = self.models[name]
        cols = torch.arange(kv_len, device=q_pos.device)
        causal = cols[None, None, :] <= q_pos[:, :, None]  # [rows, q, kv]
        impl = getattr(model.config, "_attn_implementation", None) or "eager"

        def fmt(m: torch.Tensor) -> torch.Tensor:
            m = m[:, None]
            if impl == "eager":
                zero = torch.zeros((), dtype=dtype, device=m.device)
                return torch.where(m, zero, torch.finfo(dtype).min)
            return m

        types = self._types[name]
        if types is None:
            return fmt(causal)
        masks = {"full_attention": fmt(causal)}
        if "sliding_attention" in types:
            window = int(model.config.sliding_window)
            masks["sliding_attention"] = fmt(
                causal & (cols[None, None, :] > q_pos[:, :, None] - window)
            )
        return masks

    def _dtype(self, name: str) -> torch.dtype:
        return next(self.models[name].parameters()).dtype

    def _device(self, name: str) -> torch.device:
        return next(self.models[name].parameters()).device

    # ---- forwards -----------------------------------------------------------------------
    def prefill(
        self,
        name: str,
        slot: int,
        input_ids: torch.Tensor | None = None,  # [L]
        inputs_embeds: torch.Tensor | None = None,  # [L, d]
        *,
        start: int = 0,
        logits_to_keep: int = 1,
    ) -> torch.Tensor:
        """Run ``name`` over one request's tokens at positions [start, start + L) of ``slot``.

        Returns logits [L', V] for the last ``logits_to_keep`` positions (0 = all).
        """
        x = input_ids if input_ids is not None else inputs_embeds
        length = x.shape[0]
        if start + length > self.columns[name]:
            raise ValueError(
                f"{start + length} tokens do not fit in the {name} cache "
                f"({self.columns[name]} columns)"
            )
        dev = self._device(name)
        pos = torch.arange(start, start + length, device=dev)[None]  # [1, L]
        call = functools.partial(
            self.models[name],
            input_ids=None if input_ids is None else input_ids[None].to(dev),
            inputs_embeds=None if inputs_embeds is None else inputs_embeds[None].to(dev),
            position_ids=pos,
            attention_mask=self._mask(name, pos, start + length, self._dtype(name)),
            cache=self.caches[name],
            use_cache=True,
            logits_to_keep=logits_to_keep,
        )
        p = self._plan
        p.mode, p.slot, p.start, p.kv_len = "prefill", slot, start, start + length
        try:
            (out,) = self._run([call])
        finally:
            p.mode = "idle"
        return out.logits[0]

    def decode(
        self,
        name: str,
        n: int,
        input_ids: torch.Tensor | None = None,  # [n]
        inputs_embeds: torch.Tensor | None = None,  # [n, d]
    ) -> torch.Tensor:
        """One token for each of slots 0..n-1, written at column ``lengths[slot]``.

        Returns last-position logits [n, V]. Lengths advance only in :meth:`commit`, so every
        model of a step sees the same positions.
        """
        return self.decode_many((name,), n, input_ids, inputs_embeds)[0]

    def decode_many(
        self,
        names: Sequence[str],
        n: int,
        input_ids: torch.Tensor | None = None,
        inputs_embeds: torch.Tensor | None = None,
        pool: ForwardPool | None = None,
    ) -> list[torch.Tensor]:
        """:meth:`decode` of several aligned models on the same inputs; with ``pool``, their
        forwards run side by side (they share the plan, which no forward changes)."""
        lengths = self.lengths[:n]
        if max(lengths) >= self.max_len:
            raise RuntimeError("a slot is full; the scheduler must finish it first")
        kv_len = max(lengths) + 1
        dev = self._device(names[0])  # the models of a pair share a device (IVLModel)
        pos = torch.tensor(lengths, dtype=torch.int64, device=dev)  # [n]
        ids = None if input_ids is None else input_ids[:, None].to(dev)
        embeds = None if inputs_embeds is None else inputs_embeds[:, None].to(dev)
        calls = [
            functools.partial(
                self.models[name],
                input_ids=ids,
                inputs_embeds=embeds,
                position_ids=pos[:, None],
                attention_mask=self._mask(name, pos[:, None], kv_len, self._dtype(name)),
                cache=self.caches[name],
                use_cache=True,
                logits_to_keep=1,
            )
            for name in names
        ]
        p = self._plan
        p.mode, p.n, p.pos, p.kv_len = "decode", n, pos, kv_len
        try:
            outs = self._run(calls, pool)
        finally:
            p.mode = "idle"
        return [out.logits[:, -1] for out in outs]

    def commit(self, n: int) -> None:
        """All aligned models have consumed this step's token for slots 0..n-1."""
        for s in range(n):
            self.lengths[s] += 1

    def length(self, name: str, slot: int) -> int:
        """Tokens of ``name`` cached in ``slot``."""
        own = self.own_lengths.get(name)
        return own[slot] if own is not None else self.lengths[slot]

    def crop(self, name: str, slot: int, length: int) -> None:
        """Roll an unaligned model's slot back (or set it after a prefill) to ``length`` tokens."""
        if not 0 <= length <= self.columns[name]:
            raise ValueError(f"cannot set {name} slot {slot} to {length} tokens")
        self.own_lengths[name][slot] = length

    def extend(self, name: str, n: int, input_ids: list[list[int]]) -> torch.Tensor:
        """Feed ``input_ids[r]`` (>= 1 tokens, counts may differ) to row r of an unaligned model.

        Tokens go to columns ``length(name, r) ...``; lengths advance at once. Returns the logits
        of each row's last new token, [n, V]. Rows must fit: see :meth:`fits`.
        """
        lengths = self.own_lengths[name][:n]
        (out,) = self._padded_forward((name,), 0, lengths, input_ids[:n])
        for r, row in enumerate(input_ids[:n]):
            self.own_lengths[name][r] += len(row)
        return out

    def prefill_rows(
        self,
        names: Sequence[str],
        row0: int,
        prompts: list[list[int]],
        pool: ForwardPool | None = None,
    ) -> list[torch.Tensor]:
        """Prefill rows ``row0 ..`` of each aligned model in ``names`` with one prompt each
        (lengths may differ) in one forward per model, side by side with ``pool``, at positions
        0 ... Returns each model's last-token logits [rows, V]. Slot lengths are set by
        :meth:`assign` (aligned models) or :meth:`crop` (unaligned ones)."""
        return self._padded_forward(names, row0, [0] * len(prompts), prompts, pool)

    def _padded_forward(
        self,
        names: Sequence[str],
        row0: int,
        lengths: list[int],
        input_ids: list[list[int]],
        pool: ForwardPool | None = None,
    ) -> list[torch.Tensor]:
        """Rows row0 + r get ``input_ids[r]`` at columns ``lengths[r] ...``, padded on the right
        to the longest: a padded query repeats its row's last real position and writes its K/V
        into the scratch column, which no real query can see. Several models share the columns
        (aligned), so they share the plan and can run side by side."""
        dev = self._device(names[0])
        n = len(input_ids)
        counts = [len(x) for x in input_ids]
        if min(counts) < 1:
            raise ValueError("every row needs at least one new token")
        width, scratch = max(counts), self.columns[names[0]]
        if max(ln + c for ln, c in zip(lengths, counts, strict=True)) > scratch:
            raise RuntimeError(f"a {names[0]} slot is full; the scheduler must finish it first")
        ids = torch.zeros((n, width), dtype=torch.int64)
        qpos = torch.empty((n, width), dtype=torch.int64)
        wpos = torch.full((n, width), scratch, dtype=torch.int64)
        for r, (row, ln, c) in enumerate(zip(input_ids, lengths, counts, strict=True)):
            ids[r, :c] = torch.as_tensor(row, dtype=torch.int64)
            qpos[r, :c] = torch.arange(ln, ln + c)
            qpos[r, c:] = ln + c - 1  # padding: a copy of the last real query
            wpos[r, :c] = qpos[r, :c]
        kv_len = max(ln + c for ln, c in zip(lengths, counts, strict=True))
        ids, qpos, wpos = ids.to(dev), qpos.to(dev), wpos.to(dev)
        # logits only where some row's last token is (the LM head over every padded position
        # would be [n, width, V])
        keep = sorted({c - 1 for c in counts})
        keep_t = torch.tensor(keep, device=dev)
        calls = [
            functools.partial(
                self.models[name],
                input_ids=ids,
                position_ids=qpos,
                attention_mask=self._mask(name, qpos, kv_len, self._dtype(name)),
                cache=self.caches[name],
                use_cache=True,
                logits_to_keep=keep_t,
            )
            for name in names
        ]
        p = self._plan
        p.mode, p.n, p.pos, p.kv_len, p.row0 = "extend", n, wpos, kv_len, row0
        try:
            outs = self._run(calls, pool)
        finally:
            p.mode, p.row0 = "idle", 0
        col = torch.tensor([keep.index(c - 1) for c in counts], device=dev)
        return [out.logits[torch.arange(n, device=dev), col] for out in outs]

    def _run(self, calls: list, pool: ForwardPool | None = None) -> list:
        """The forwards' outputs: side by side with ``pool``, else one after the other."""
        if self.narrow_linears:  # switched on in whichever thread runs the forward
            calls = [with_narrow_linears(call) for call in calls]
        if pool is not None:
            return pool.run(calls)
        return [call() for call in calls]

    def fits(self, name: str, slot: int, new: int) -> bool:
        """Whether ``new`` more tokens fit in ``slot`` of ``name``."""
        return self.length(name, slot) + new <= self.columns[name]

    # ---- slot bookkeeping ---------------------------------------------------------------
    def assign(self, slot: int, length: int) -> None:
        """Slot ``slot`` now holds a request whose first ``length`` positions are cached."""
        self.lengths[slot] = length

    def move(self, src: int, dst: int) -> None:
        """Move the request in slot ``src`` to slot ``dst`` in every model's cache."""
        if src == dst:
            return
        for name, cache in self.caches.items():
            length = self.length(name, src)
            for layer in cache.layers:
                layer.move_row(src, dst, length)
        for own in self.own_lengths.values():
            own[dst], own[src] = own[src], 0
        self.lengths[dst], self.lengths[src] = self.lengths[src], 0

    def release(self, slot: int) -> None:
        self.lengths[slot] = 0
        for own in self.own_lengths.values():
            own[slot] = 0

    def nbytes(self) -> int:
        return sum(c.nbytes() for c in self.caches.values())
