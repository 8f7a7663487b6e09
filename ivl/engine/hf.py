"""Hugging Face integration: ``IVLLogitsProcessor`` for users who keep their own ``generate`` loop.

The processor owns the value model and its KV cache. At each call it feeds the value model only
the tokens it has not seen (the whole prompt on the first call, then one token per step), and
returns ``ivl.merge_logits(scores, z_value, alpha, ...)``. Greedy HF ``generate`` with it gives
the engine's greedy tokens; for sampling, put it before HF's temperature / top-k / top-p warpers
(HF applies user processors after its own, so prefer ``do_sample=False`` or the engine when the
exact IVL sampling contract matters).
"""

from __future__ import annotations

import torch

from ivl.engine.concurrent import narrow_linears
from ivl.engine.model import IVLModel


class IVLLogitsProcessor:
    """A ``transformers`` logits processor adding ``alpha * z_value`` to the base's scores.

    Parameters
    ----------
    model : IVLModel
        Supplies the value model (residual or proxy scheme), the vocab map and vocab_limit.
    alpha : float
        Value strength.
    attention_mask : int [B, L_prompt], optional
        The prompt's attention mask when the batch is (left-)padded; default: no padding.

    Examples
    --------
    >>> proc = IVLLogitsProcessor(ivl_model, alpha=1.0, attention_mask=enc.attention_mask)
    >>> out = ivl_model.base.generate(**enc, logits_processor=[proc], do_sample=False)
    ... # doctest: +SKIP
    """

    def __init__(self, model: IVLModel, *, alpha: float = 1.0, attention_mask=None):
        if model.value is None:
            raise ValueError("IVLLogitsProcessor needs an IVLModel with a value model")
        model.require_shared_tokenizer("IVLLogitsProcessor")
        if model.scheme not in ("residual", "proxy"):
            raise ValueError(
                f"scheme {model.scheme!r} needs the base distribution at every prompt position; "
                "use IVLEngine for cascade schemes"
            )
        self.model, self.alpha = model, float(alpha)
        self.prompt_mask = attention_mask
        self.reset()

    def reset(self) -> None:
        """Forget the cached prefix (called automatically when a new generation starts)."""
        from transformers import DynamicCache

        self.caches = {
            name: DynamicCache(config=m.config)
            for name, m in (("value", self.model.value), ("anti", self.model.anti_expert))
            if m is not None
        }
        self.seen = 0
        self.mask: torch.Tensor | None = None
        self.prefix: torch.Tensor | None = None

    def _run(self, name: str, model, new_ids, pos) -> torch.Tensor:
        out = model(
            input_ids=new_ids,
            attention_mask=self.mask,
            position_ids=pos,
            cache=self.caches[name],
            use_cache=True,
            logits_to_keep=1,
        )
        return out.logits[:, -1]

    @torch.inference_mode()
    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor) -> torch.Tensor:
        import ivl

        b, length = input_ids.shape
        fresh = (
            self.prefix is None
            or length != self.seen + 1
            or self.prefix.shape[0] != b
            or not torch.equal(input_ids[:, : self.seen], self.prefix)
        )
        if fresh:
            self.reset()
            if self.prompt_mask is not None and self.prompt_mask.shape == input_ids.shape:
                self.mask = self.prompt_mask.to(input_ids.device, torch.int64)
            else:
                self.mask = torch.ones_like(input_ids)
        else:
            self.mask = torch.cat([self.mask, self.mask.new_ones(b, 1)], dim=1)
        new_ids = input_ids[:, self.seen :]
        pos = (self.mask.cumsum(-1) - 1).clamp(min=0)[:, self.seen :]
        with narrow_linears():  # CPU decode steps: ivl's narrow kernel (concurrent.py)
            zv = self._run("value", self.model.value, new_ids, pos)
            if "anti" in self.caches:
                zv = zv.float() - self._run("anti", self.model.anti_expert, new_ids, pos).float()
        self.seen, self.prefix = length, input_ids.clone()
        merged = ivl.merge_logits(
            scores,
            zv,
            alpha=self.alpha,
            vocab_map=self.model.vocab_map,
            fill=self.model.fill,
            vocab_limit=min(self.model.vocab_limit, scores.shape[1]),
        )
        return merged.to(scores.dtype)
