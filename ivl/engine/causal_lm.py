"""``IVLForCausalLM``: an :class:`IVLModel` as a ``transformers`` causal LM.

Its ``forward`` returns the merged logits ``z_base + alpha * z_value`` (``ivl.merge_logits``;
proxy-tuning: ``z_base + alpha * (z_expert - z_anti)``), so ``generate()`` (greedy, sampling,
beam search), ``pipeline("text-generation", ...)`` and other HF tools work unchanged.

Caches: :class:`IVLCache` is one ``transformers.Cache`` holding a ``DynamicCache`` per model
(base, value, anti-expert). It reports the base cache's length to ``generate`` and applies
beam reordering / cropping to every model's cache, so all models stay position-aligned. When
``generate`` hands ``forward`` its default (empty) ``DynamicCache``, forward swaps in an
``IVLCache`` and returns it in ``outputs.cache``, which ``generate`` feeds back on the next step.

For throughput (continuous batching, one fused merge/sample per step) use :class:`IVLEngine`;
this class is for compatibility with HF tooling.
"""

from __future__ import annotations

import copy

import torch
from transformers import DynamicCache, GenerationMixin, PreTrainedModel
from transformers.cache_utils import Cache
from transformers.modeling_outputs import CausalLMOutputWithPast

from ivl.engine.concurrent import narrow_linears
from ivl.engine.model import IVLModel

_CASCADE = ("cascade", "cascade_no_text")


def _list_for_text_generation() -> None:
    """Name IVLForCausalLM among the causal LMs ``pipeline("text-generation")`` checks by class
    name, so it does not log a page-long "not supported" error (it is supported: tested). The
    key has no config registered, so no Auto* lookup can ever resolve to it."""
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

    MODEL_FOR_CAUSAL_LM_MAPPING_NAMES.setdefault("ivl", "IVLForCausalLM")


_list_for_text_generation()


class IVLCache(Cache):
    """One ``DynamicCache`` per model of an :class:`IVLModel`, kept position-aligned.

    ``caches`` maps ``base`` / ``value`` / ``anti`` to the models' caches. Sequence length and
    layer properties are the base's; reorder / crop / batch selection apply to all.
    """

    def __init__(self, model: IVLModel):
        models = {"base": model.base, "value": model.value, "anti": model.anti_expert}
        self.caches = {
            name: DynamicCache(config=m.config) for name, m in models.items() if m is not None
        }
        # generate() inspects ``layers`` (is_linear, is_compileable, ...): the base's answer.
        super().__init__(layers=self.caches["base"].layers)

    def update(self, *args, **kwargs):
        raise RuntimeError("IVLCache is a container; each model updates its own entry in .caches")

    def get_seq_length(self, layer_idx: int = 0) -> int:
        return self.caches["base"].get_seq_length(layer_idx)

    def get_mask_sizes(self, query_length: int, layer_idx: int) -> tuple[int, int]:
        return self.caches["base"].get_mask_sizes(query_length, layer_idx)

    def reset(self) -> None:
        for c in self.caches.values():
            c.reset()

    def reorder_cache(self, beam_idx: torch.LongTensor) -> None:
        for c in self.caches.values():
            c.reorder_cache(beam_idx)

    def crop(self, tokens_to_remove: int) -> None:
        for c in self.caches.values():
            c.crop(tokens_to_remove)

    def batch_repeat_interleave(self, repeats: int) -> None:
        for c in self.caches.values():
            c.batch_repeat_interleave(repeats)

    def batch_select_indices(self, indices: torch.Tensor) -> None:
        for c in self.caches.values():
            c.batch_select_indices(indices)


def _keep(z: torch.Tensor, logits_to_keep) -> torch.Tensor:
    """The positions of ``z`` [B, L, V] that HF's ``logits_to_keep`` asks for."""
    if isinstance(logits_to_keep, int):
        return z if logits_to_keep == 0 else z[:, -logits_to_keep:]
    return z[:, logits_to_keep]


class IVLForCausalLM(PreTrainedModel, GenerationMixin):
    """A base LM steered by a value network, as a ``transformers`` ``PreTrainedModel``.

    Parameters
    ----------
    model : IVLModel
        The base, value (or expert + anti-expert for ``scheme="proxy"``), vocab map and
        tokenizer. ``config`` and ``generation_config`` are copies of the base's.
    alpha : float
        Default value strength; ``forward(..., alpha=)`` / ``generate(..., alpha=)`` override it
        per call. ``alpha=0`` skips the value model (base alone).

    Examples
    --------
    >>> lm = IVLForCausalLM.from_pretrained("smollm2-135m", "path/to/value")  # doctest: +SKIP
    >>> out = lm.generate(**lm.tokenizer("Hi", return_tensors="pt"), max_new_tokens=20)
    ... # doctest: +SKIP
    >>> from transformers import pipeline  # doctest: +SKIP
    >>> pipe = pipeline("text-generation", model=lm, tokenizer=lm.tokenizer)  # doctest: +SKIP
    """

    main_input_name = "input_ids"
    base_model_prefix = "base"
    _supports_sdpa = True
    _supports_attention_backend = True
    _is_stateful = False

    def __init__(self, model: IVLModel, *, alpha: float = 1.0):
        if not isinstance(model, IVLModel):
            raise TypeError(
                f"IVLForCausalLM wraps an ivl.IVLModel, got {type(model).__name__}; use "
                "IVLForCausalLM.from_pretrained(base, value) to load one"
            )
        if getattr(model, "bridge", None) is not None:  # value reads another tokenization
            model.require_shared_tokenizer("IVLForCausalLM")
        config = copy.deepcopy(model.base.config)
        super().__init__(config)
        self.ivl = model
        # registered as submodules so .to(), .eval(), .parameters() and the device see them
        self.base = model.base
        self.value = model.value
        self.anti_expert = model.anti_expert
        self.alpha = float(alpha)
        gen = getattr(model.base, "generation_config", None)
        if gen is not None:
            self.generation_config = copy.deepcopy(gen)
        self.eval()

    @classmethod
    def from_pretrained(cls, base, value=None, *, alpha: float = 1.0, **kwargs) -> IVLForCausalLM:
        """Load like :meth:`IVLModel.from_pretrained` (same arguments) and wrap the result."""
        return cls(IVLModel.from_pretrained(base, value, **kwargs), alpha=alpha)

    def save_pretrained(self, *args, **kwargs):
        raise NotImplementedError(
            "IVLForCausalLM is a view over a base and a value model; save the value network "
            "(its training run writes it) and rebuild with IVLForCausalLM.from_pretrained"
        )

    @property
    def tokenizer(self):
        return self.ivl.tokenizer

    def get_input_embeddings(self):
        return self.base.get_input_embeddings()

    def get_output_embeddings(self):
        return None  # the output is a merge of several heads, not one matrix

    def _init_weights(self, module):  # never re-initialise the wrapped (trained) models
        pass

    def forward(
        self,
        input_ids: torch.LongTensor | None = None,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.LongTensor | None = None,
        cache: Cache | None = None,
        inputs_embeds: torch.Tensor | None = None,
        labels: torch.LongTensor | None = None,
        use_cache: bool | None = None,
        logits_to_keep: int | torch.Tensor = 0,
        alpha: float | None = None,
        **kwargs,
    ) -> CausalLMOutputWithPast:
        """Merged logits [B, L', V_base] (fp32; ids >= the tokenizer's size are -inf)."""
        m = self.ivl
        if input_ids is None or inputs_embeds is not None:
            raise ValueError(
                "IVLForCausalLM reads token ids: pass input_ids (inputs_embeds is not supported, "
                "the value model needs the tokens)"
            )
        alpha = self.alpha if alpha is None else float(alpha)
        if use_cache is None:
            use_cache = cache is not None or bool(getattr(self.config, "use_cache", True))
        if not use_cache:
            cache = None
        elif not isinstance(cache, IVLCache):
            if cache is not None and cache.get_seq_length() > 0:
                raise ValueError(
                    f"got a filled {type(cache).__name__}; IVLForCausalLM needs an IVLCache "
                    "(one cache per model): pass none, or the one a previous call returned"
                )
            cache = IVLCache(m)  # replaces generate()'s default single-model cache
        past = cache.get_seq_length() if cache is not None else 0

        def run(name: str, model, keep, **inputs) -> torch.Tensor:
            with narrow_linears():  # CPU decode steps: ivl's narrow kernel (concurrent.py)
                out = model(
                    attention_mask=attention_mask,
                    position_ids=position_ids,
                    cache=None if cache is None else cache.caches[name],
                    use_cache=use_cache,
                    logits_to_keep=keep,
                    **inputs,
                )
            return out.logits

        cascade = m.scheme in _CASCADE
        # cascade schemes feed softmax(z_base) at every new position into the value
        zb = run("base", m.base, 0 if cascade else logits_to_keep, input_ids=input_ids)
        zv = None
        if m.value is not None and alpha != 0:
            if cache is not None and cache.caches["value"].get_seq_length() != past:
                raise ValueError(
                    "the value model's cache missed tokens that were processed with alpha=0; "
                    "start a new cache (or keep alpha constant within a generation)"
                )
            if cascade:
                emb = m.value_inputs_embeds(input_ids, zb)
                zv = run("value", m.value, logits_to_keep, inputs_embeds=emb)
            else:
                zv = run("value", m.value, logits_to_keep, input_ids=input_ids)
            if m.anti_expert is not None:
                za = run("anti", m.anti_expert, logits_to_keep, input_ids=input_ids)
                zv = zv.float() - za.float()
        if cascade:
            zb = _keep(zb, logits_to_keep)
        logits = self._merge(zb, zv, alpha)
        loss = None
        if labels is not None:
            if logits.shape[1] != labels.shape[1]:
                raise ValueError("labels need logits at every position: pass logits_to_keep=0")
            loss = torch.nn.functional.cross_entropy(
                logits[:, :-1].reshape(-1, logits.shape[-1]),
                labels[:, 1:].reshape(-1).to(logits.device),
                ignore_index=-100,
            )
        return CausalLMOutputWithPast(loss=loss, logits=logits, cache=cache)

    def _merge(self, zb: torch.Tensor, zv: torch.Tensor | None, alpha: float) -> torch.Tensor:
        import ivl

        m = self.ivl
        b, length, v = zb.shape
        merged = ivl.merge_logits(
            zb.reshape(b * length, v),
            None if zv is None else zv.reshape(b * length, zv.shape[-1]),
            alpha=alpha,
            vocab_map=m.vocab_map if zv is not None else None,
            fill=m.fill,
            vocab_limit=m.vocab_limit,
        )
        return merged.view(b, length, v)
