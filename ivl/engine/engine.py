"""``IVLEngine``: continuous-batching generation with a base and a value model.

Per step (DESIGN.md "Data flow at inference"):

1. admit queued requests into free slots: each is prefilled *alone* (all prompt tokens but the
   last) into its slot of every model's cache; the last prompt token becomes the slot's pending
   input, so a fresh request joins the very next batched decode step;
2. one batched decode forward per model over slots 0..n-1 (the value forward is skipped when
   every active request has alpha = 0; proxy-tuning runs expert and anti-expert);
3. ONE ``ivl.merge_sample`` call with per-row alpha / temperature / top-k / top-p / min-p and
   per-row (seed, step), step = number of tokens the request has generated, so a request's
   tokens do not depend on its batch neighbours or arrival time;
4. stop checks (stop token ids, stop strings across token boundaries, max_new_tokens, full
   cache), streaming text deltas; finished requests free their slot at once (the last slot's
   request moves into the hole) and are refilled from the queue on the next step.

A request that fails (prompt too long, empty, NaN logits) gets a ``Result`` with
``finish_reason="error"``; the others continue.

With a value model of another tokenizer (``IVLModel.bridge``), each request also carries a
:class:`~ivl.engine.bridge.BridgeState`: the value model reads the text in its own tokens, in a
cache with its own per-slot lengths. Per step, each row's value cache is cropped to the common
prefix of its old and new value ids and the new ids (one or more, a different count per row) are
fed in one batched ``extend`` forward; the value logits of each row's last token are mapped into
the base vocabulary by the fused op (``vocab_map``).
"""

from __future__ import annotations

import logging
from collections import deque
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field

import torch

from ivl.engine.bridge import BridgeState
from ivl.engine.cache import PairedKVCache
from ivl.engine.concurrent import ForwardPool
from ivl.engine.model import IVLModel
from ivl.engine.params import Result, SamplingParams, StreamEvent, derive_seed

logger = logging.getLogger("ivl")

_CTX_TOKENS = 4  # prompt tokens decoded in front of the output, so leading spaces render right


@dataclass
class _Request:
    index: int
    prompt: object
    params: SamplingParams
    seed: int
    ids: list[int] = field(default_factory=list)
    stop_ids: frozenset = frozenset()
    pending: int = -1
    ctx: list[int] = field(default_factory=list)
    ctx_text: str = ""
    text: str = ""
    emitted: int = 0
    result: Result | None = None
    bridge: BridgeState | None = None


# Padded tokens per batched prefill forward (rows x longest prompt): bounds its activations.
_PREFILL_TOKENS = 8192
# Forwards whose weights are within this ratio run side by side by default (IVLEngine).
_SIMILAR_COST = 0.5


def _forward_weights(model) -> int:
    """Weights a forward multiplies by: every parameter except an input embedding that is not
    also the output head (a lookup, not a product)."""
    total = sum(p.numel() for p in model.parameters())
    emb, head = model.get_input_embeddings(), model.get_output_embeddings()
    tied = head is not None and head.weight is emb.weight
    return total if tied else total - emb.weight.numel()


class _Text:
    """Incremental detokenisation with stop strings (which may span tokens)."""

    def __init__(self, tokenizer):
        self.tok = tokenizer

    def start(self, req: _Request) -> None:
        req.ctx = req.ids[-_CTX_TOKENS:]
        req.ctx_text = self.tok.decode(req.ctx, skip_special_tokens=True)

    def update(self, req: _Request) -> tuple[str, bool]:
        """Recompute the text; return (delta safe to emit, hit a stop string)."""
        tokens = req.result.token_ids
        full = self.tok.decode(req.ctx + tokens, skip_special_tokens=True)
        if full.startswith(req.ctx_text):
            text = full[len(req.ctx_text) :]
        else:
            text = self.tok.decode(tokens, skip_special_tokens=True)
        hit = False
        for s in req.params.stop:
            i = text.find(s)
            if i >= 0:
                text, hit = text[:i], True
        req.text = text
        if hit:
            return "", True
        safe = text.rstrip("\ufffd")  # an incomplete UTF-8 sequence: wait for its next bytes
        hold = 0
        for s in req.params.stop:  # a suffix that could start a stop string: hold it back
            for k in range(min(len(s) - 1, len(safe)), hold, -1):
                if safe.endswith(s[:k]):
                    hold = k
                    break
        end = len(safe) - hold
        if end <= req.emitted:
            return "", False
        delta = safe[req.emitted : end]
        req.emitted = end
        return delta, False

    def finish(self, req: _Request) -> str:
        delta = req.text[req.emitted :] if len(req.text) > req.emitted else ""
        req.emitted = len(req.text)
        return delta


class IVLEngine:
    """Batched, KV-cached generation for an :class:`IVLModel`.

    Parameters
    ----------
    model : IVLModel
    max_batch : int
        Concurrent requests (cache slots).
    max_len : int, optional
        Positions per slot (prompt + generated tokens); default: the smaller of the models'
        ``max_position_embeddings`` and 2048. Caches are allocated once, on first use, for
        (max_batch, max_len) per model.
    seed : int
        Base for the seeds of requests whose ``SamplingParams.seed`` is None (derived from the
        request's index in the call).
    value_max_len : int, optional
        Value-side positions per slot when the value model has another tokenizer (its token
        count differs from the base's); default: twice ``max_len`` (capped by the value's
        ``max_position_embeddings``). A request whose value side fills up finishes ("length").
    parallel_forwards : bool, optional
        Run the forwards of a step that do not depend on each other side by side, one worker
        thread each (ivl.engine.concurrent). Default: on the CPU, when the models cost about the
        same per token (the smallest multiplies at least half the weights of the largest);
        otherwise one after the other, each with every thread.

    Attributes
    ----------
    bridge_stats : dict
        With a bridged value model: ``steps`` (base tokens generated), ``fed`` (value tokens
        run through the value model for them) and ``encoded`` (value tokens produced by tail
        re-encodings), summed over finished requests.

    Examples
    --------
    >>> engine = IVLEngine(IVLModel.from_pretrained(base, value), max_batch=8)  # doctest: +SKIP
    >>> engine.generate_many(["Hi!"], SamplingParams(temperature=0))[0].text  # doctest: +SKIP
    """

    def __init__(
        self,
        model: IVLModel,
        *,
        max_batch: int = 8,
        max_len: int | None = None,
        seed: int = 0,
        value_max_len: int | None = None,
        parallel_forwards: bool | None = None,
    ):
        self.model = model
        models = {"base": model.base}
        if model.value is not None:
            models["value"] = model.value
        if model.anti_expert is not None:
            models["anti"] = model.anti_expert
        if max_len is None:
            limits = [
                getattr(m.config, "max_position_embeddings", None) or 2048 for m in models.values()
            ]
            max_len = min(2048, *limits)
        self.max_batch, self.max_len, self.seed = int(max_batch), int(max_len), int(seed)
        unaligned = {}
        if model.bridge is not None:
            limit = getattr(model.value.config, "max_position_embeddings", None) or 2 * max_len
            unaligned["value"] = int(value_max_len or min(2 * self.max_len, limit))
        self.cache = PairedKVCache(models, self.max_batch, self.max_len, unaligned)
        side_by_side = model.bridge is None and model.scheme not in ("cascade", "cascade_no_text")
        on_cpu = model.device.type == "cpu"
        if parallel_forwards is None:
            # Side by side each forward has one thread; a big base beside a small value would
            # then set the step time alone, where one after the other it gets every thread.
            costs = [_forward_weights(m) for m in models.values()]
            parallel_forwards = on_cpu and min(costs) >= _SIMILAR_COST * max(costs)
        self._pool = (
            ForwardPool.for_cpu(len(models)) if parallel_forwards and side_by_side else None
        )
        # decode-step linears through ivl's narrow kernel (IVLModel routed them; concurrent.py)
        self.cache.narrow_linears = on_cpu
        self.bridge_stats = {"steps": 0, "fed": 0, "encoded": 0}
        self._text = _Text(model.tokenizer)
        self._eos = frozenset(model.eos_ids())

    # ---- public API ---------------------------------------------------------------------
    def generate(
        self, prompt, params: SamplingParams | None = None, *, chat: bool = False
    ) -> Result:
        """One prompt; raises ValueError if the request fails."""
        result = self.generate_many([prompt], params, chat=chat)[0]
        if result.error is not None:
            raise ValueError(result.error)
        return result

    def generate_many(
        self,
        prompts: Sequence,
        params: SamplingParams | Sequence[SamplingParams] | None = None,
        *,
        chat: bool = False,
        progress: bool = False,
    ) -> list[Result]:
        """Generate for every prompt (continuous batching); results in input order.

        ``prompts``: strings, token-id lists or chat message lists. ``params``: one
        ``SamplingParams`` for all, or one per prompt. Failed requests carry ``error``.
        """
        results: list[Result | None] = [None] * len(prompts)
        bar = None
        if progress:
            from tqdm.auto import tqdm

            bar = tqdm(total=len(prompts), unit="req", desc="generate")
        try:
            for event in self.stream(prompts, params, chat=chat):
                if event.result is not None:
                    results[event.request_id] = event.result
                    if bar is not None:
                        bar.update(1)
        finally:
            if bar is not None:
                bar.close()
        return results  # type: ignore[return-value]

    def stream(
        self,
        prompts: Sequence,
        params: SamplingParams | Sequence[SamplingParams] | None = None,
        *,
        chat: bool = False,
    ) -> Iterator[StreamEvent]:
        """Yield :class:`StreamEvent` s ``(request_id, token, text_delta)`` as tokens are made.

        request_id is the prompt's index. Each request ends with one event whose ``token`` is
        None and whose ``result`` is its :class:`Result`.
        """
        if isinstance(prompts, str):
            raise TypeError("prompts must be a list; use generate() for one prompt")
        if params is None:
            params = SamplingParams()
        if isinstance(params, SamplingParams):
            params = [params] * len(prompts)
        elif len(params) != len(prompts):
            raise ValueError(f"got {len(params)} SamplingParams for {len(prompts)} prompts")
        queue = deque()
        for i, (prompt, p) in enumerate(zip(prompts, params, strict=True)):
            if not isinstance(p, SamplingParams):
                raise TypeError(f"params[{i}] must be a SamplingParams, got {type(p).__name__}")
            seed = p.seed if p.seed is not None else derive_seed(i, self.seed)
            req = _Request(i, prompt, p, seed)
            req.result = Result(i, prompt, seed=seed, logprobs=[] if p.logprobs else None)
            try:
                req.ids = self.model.encode(prompt, chat=chat)
                req.result.prompt_tokens = len(req.ids)
                if len(req.ids) > self.max_len:
                    raise ValueError(
                        f"prompt has {len(req.ids)} tokens but the cache holds {self.max_len} "
                        "per request: shorten it or raise max_len"
                    )
            except (ValueError, TypeError) as e:
                yield self._fail(req, str(e))
                continue
            stop_ids = set(p.stop_token_ids)
            if not p.ignore_eos:
                stop_ids |= self._eos
            req.stop_ids = frozenset(stop_ids)
            queue.append(req)
        yield from self._run(queue)

    # ---- the scheduler ------------------------------------------------------------------
    def _fail(self, req: _Request, message: str) -> StreamEvent:
        req.result.error = message
        req.result.finish_reason = "error"
        req.result.text = req.text
        logger.warning("request %d failed: %s", req.index, message)
        return StreamEvent(req.index, None, "", req.result)

    def _admit(self, req: _Request, slot: int) -> bool:
        """Take ``req`` into ``slot``; True when its prefill is left to :meth:`_prefill_batch`
        (residual / proxy schemes: prompts admitted together share one forward per model)."""
        m, cache = self.model, self.cache
        ids = req.ids
        cascade = m.scheme in ("cascade", "cascade_no_text")
        if m.bridge is not None:
            self._admit_bridged(req, slot)
        elif cascade and len(ids) > 1:
            # the value reads softmax(z_base) at every prompt position: one request at a time
            prefix = torch.tensor(ids[:-1], dtype=torch.int64, device=m.device)
            zb = cache.prefill("base", slot, prefix, logits_to_keep=0)
            if m.value is not None and req.params.alpha != 0:
                cache.prefill("value", slot, inputs_embeds=m.value_inputs_embeds(prefix, zb))
                if m.anti_expert is not None:
                    cache.prefill("anti", slot, prefix)
        cache.assign(slot, len(ids) - 1)
        req.pending = ids[-1]
        self._text.start(req)
        return m.bridge is None and not cascade and len(ids) > 1

    def _prefill_batch(self, rows: list[tuple[int, _Request]]) -> None:
        """Prefill deferred requests: each run of consecutive slots in forwards of at most
        ``_PREFILL_TOKENS`` padded tokens, one per model (right-padded, see
        PairedKVCache.prefill_rows)."""
        m, cache = self.model, self.cache
        groups: list[list[tuple[int, _Request]]] = []
        width = 0  # longest prompt of the last group
        for slot, req in rows:
            n = len(req.ids) - 1
            g = groups[-1] if groups else None
            if g and g[-1][0] == slot - 1 and max(width, n) * (len(g) + 1) <= _PREFILL_TOKENS:
                g.append((slot, req))
                width = max(width, n)
            else:
                groups.append([(slot, req)])
                width = n
        for g in groups:
            prompts = [r.ids[:-1] for _, r in g]
            names = ["base"]
            if m.value is not None and any(r.params.alpha != 0 for _, r in g):
                names += ["value", "anti"] if m.anti_expert is not None else ["value"]
            cache.prefill_rows(names, g[0][0], prompts, pool=self._pool if names[1:] else None)

    def _admit_bridged(self, req: _Request, slot: int) -> None:
        """Base prefill as usual; the value model reads the prompt's text in its own tokens."""
        m, cache = self.model, self.cache
        if len(req.ids) > 1:
            prefix = torch.tensor(req.ids[:-1], dtype=torch.int64, device=m.device)
            cache.prefill("base", slot, prefix, logits_to_keep=1)
        cache.crop("value", slot, 0)
        if req.params.alpha == 0:
            return
        st = m.bridge.start(req.ids)
        if not st.ids:
            raise ValueError("the prompt has no text the value model can read")
        if len(st.ids) > cache.columns["value"]:
            raise ValueError(
                f"the prompt is {len(st.ids)} tokens for the value model but its cache holds "
                f"{cache.columns['value']} per request: shorten it or raise value_max_len"
            )
        if len(st.ids) > 1:
            cache.prefill(
                "value", slot, torch.tensor(st.ids[:-1], dtype=torch.int64, device=m.device)
            )
        st.cached = len(st.ids) - 1
        cache.crop("value", slot, st.cached)
        req.bridge = st

    def _value_bridged(self, active: list[_Request]) -> torch.Tensor:
        """Crop each row's value cache to the common prefix and feed its new value ids."""
        cache, feeds = self.cache, []
        for i, r in enumerate(active):
            st = r.bridge
            if st is None:  # alpha = 0: the row's value logits are never used
                cache.crop("value", i, 0)
                feeds.append([0])
                continue
            keep, new = st.feed()
            cache.crop("value", i, keep)
            feeds.append(new)
            st.fed += len(new)
        zv = cache.extend("value", len(active), feeds)
        for i, r in enumerate(active):
            if r.bridge is None:
                cache.crop("value", i, 0)
            else:
                r.bridge.cached = len(r.bridge.ids)
        return zv

    def _forward(self, active: list[_Request]) -> tuple[torch.Tensor, torch.Tensor | None]:
        m, cache = self.model, self.cache
        n = len(active)
        inp = torch.tensor([r.pending for r in active], dtype=torch.int64, device=m.device)
        zv = None
        if m.value is None or all(r.params.alpha == 0 for r in active):
            zb = cache.decode("base", n, inp)  # [n, V_base]
        elif m.bridge is not None:
            zb = cache.decode("base", n, inp)
            zv = self._value_bridged(active)
        elif m.scheme in ("cascade", "cascade_no_text"):
            zb = cache.decode("base", n, inp)
            zv = cache.decode("value", n, inputs_embeds=m.value_inputs_embeds(inp, zb))
        else:  # residual / proxy: forwards on the same tokens, side by side with a pool
            names = ("base", "value", "anti") if m.anti_expert is not None else ("base", "value")
            zb, zv, *anti = cache.decode_many(names, n, inp, pool=self._pool)
            if anti:
                zv = zv.float() - anti[0].float()
        cache.commit(n)
        return zb, zv

    def _sample(self, active, zb, zv) -> tuple[list[int], list[float]]:
        import ivl

        dev = zb.device
        ps = [r.params for r in active]

        def t(values, dtype):
            return torch.tensor(values, dtype=dtype, device=dev)

        tokens, logprobs = ivl.merge_sample(
            zb,
            zv,
            alpha=t([p.alpha for p in ps], torch.float32),
            vocab_map=self.model.vocab_map if zv is not None else None,
            fill=self.model.fill,
            vocab_limit=self.model.vocab_limit,
            temperature=t([p.temperature for p in ps], torch.float32),
            top_k=t([p.top_k for p in ps], torch.int64),
            top_p=t([p.top_p for p in ps], torch.float32),
            min_p=t([p.min_p for p in ps], torch.float32),
            seed=t([r.seed for r in active], torch.int64),
            step=t([len(r.result.token_ids) for r in active], torch.int64),
        )
        return tokens.tolist(), logprobs.tolist()

    def _finish(self, req: _Request, reason: str) -> StreamEvent:
        if req.bridge is not None:
            for k in self.bridge_stats:
                self.bridge_stats[k] += getattr(req.bridge, k)
        req.result.finish_reason = reason
        delta = self._text.finish(req)
        req.result.text = req.text
        return StreamEvent(req.index, None, delta, req.result)

    def _run(self, queue: deque) -> Iterator[StreamEvent]:
        # inference_mode is entered per step, never across a yield: it is thread-local state
        # and must not leak into the caller's code between events.
        active: list[_Request] = []
        while queue or active:
            with torch.inference_mode():
                events, active = self._step(queue, active)
            yield from events

    def _step(self, queue: deque, active: list[_Request]):
        cache, events, deferred = self.cache, [], []
        while queue and len(active) < self.max_batch:
            req = queue.popleft()
            try:
                if self._admit(req, len(active)):
                    deferred.append((len(active), req))
            except ValueError as e:
                cache.release(len(active))
                events.append(self._fail(req, str(e)))
                continue
            active.append(req)
        if deferred:
            self._prefill_batch(deferred)
        if not active:
            return events, active
        zb, zv = self._forward(active)
        tokens, logprobs = self._sample(active, zb, zv)
        done: list[int] = []
        for i, (req, tok, lp) in enumerate(zip(active, tokens, logprobs, strict=True)):
            for e in self._consume(req, tok, lp, cache.lengths[i]):
                events.append(e)
                if e.result is not None:
                    done.append(i)
        if done:
            active = self._compact(active, done)
        return events, active

    def _consume(self, req: _Request, tok: int, lp: float, cached: int) -> list[StreamEvent]:
        import ivl

        res, p = req.result, req.params
        if tok == ivl.INVALID_TOKEN:
            return [
                self._fail(
                    req,
                    "the merged logits have no distribution (NaN or inf); try dtype=float32 or a "
                    "smaller alpha",
                )
            ]
        if tok in req.stop_ids:
            return [self._finish(req, "stop")]
        res.token_ids.append(tok)
        if res.logprobs is not None:
            res.logprobs.append(lp)
        delta, hit = self._text.update(req)
        events = [StreamEvent(req.index, tok, delta)]
        if hit:
            events.append(self._finish(req, "stop"))
        elif len(res.token_ids) >= p.max_new_tokens:
            events.append(self._finish(req, "length"))
        elif cached >= self.max_len:
            logger.warning("request %d filled its cache slot (max_len=%d)", req.index, self.max_len)
            events.append(self._finish(req, "length"))
        else:
            req.pending = tok
            st = req.bridge
            if st is not None:
                self.model.bridge.step(st, tok)
                if len(st.ids) > self.cache.columns["value"]:
                    logger.warning(
                        "request %d filled its value cache slot (value_max_len=%d)",
                        req.index,
                        self.cache.columns["value"],
                    )
                    events.append(self._finish(req, "length"))
        return events

    def _compact(self, active: list[_Request], done: list[int]) -> list[_Request]:
        """Drop finished rows; move rows from the tail into the holes (slots stay 0..n-1)."""
        gone = set(done)
        n_new = len(active) - len(gone)
        holes = [i for i in sorted(gone) if i < n_new]
        movers = [i for i in range(n_new, len(active)) if i not in gone]
        new = list(active)
        for hole, src in zip(holes, movers, strict=True):
            self.cache.move(src, hole)
            new[hole] = active[src]
        for i in range(n_new, len(active)):
            self.cache.release(i)
        return new[:n_new]
