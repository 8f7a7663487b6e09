"""The no-cache reference loop (what the authors' release does): every step recomputes both
models over the whole prefix, batch 1. Slow on purpose; the engine is tested against it and the
benchmark compares with it.
"""

from __future__ import annotations

import torch

from ivl.engine.model import IVLModel
from ivl.engine.params import SamplingParams


@torch.inference_mode()
def naive_generate(
    model: IVLModel, ids: list[int], params: SamplingParams, *, seed: int | None = None
) -> list[int]:
    """Generated token ids for prompt ``ids`` (stop tokens excluded, stop strings ignored)."""
    import ivl

    model.require_shared_tokenizer("naive_generate")
    seed = params.seed if seed is None else seed
    if seed is None:
        raise ValueError("naive_generate needs a seed (params.seed or seed=)")
    stop = set(params.stop_token_ids) | (set() if params.ignore_eos else model.eos_ids())
    seq = list(ids)
    out: list[int] = []
    for step in range(params.max_new_tokens):
        x = torch.tensor([seq], dtype=torch.int64, device=model.device)
        zb_all = model.base(input_ids=x, use_cache=False).logits  # [1, L, V]
        zb = zb_all[:, -1]
        zv = None
        if model.value is not None and params.alpha != 0:
            if model.scheme in ("cascade", "cascade_no_text"):
                emb = model.value_inputs_embeds(x, zb_all)
                zv = model.value(inputs_embeds=emb, use_cache=False).logits[:, -1]
            else:
                zv = model.value(input_ids=x, use_cache=False).logits[:, -1]
            if model.anti_expert is not None:
                za = model.anti_expert(input_ids=x, use_cache=False).logits[:, -1]
                zv = zv.float() - za.float()
        tok, _ = ivl.merge_sample(
            zb,
            zv,
            alpha=float(params.alpha),
            vocab_map=model.vocab_map if zv is not None else None,
            fill=model.fill,
            vocab_limit=model.vocab_limit,
            temperature=float(params.temperature),
            top_k=params.top_k,
            top_p=float(params.top_p),
            min_p=float(params.min_p),
            seed=seed,
            step=step,
        )
        t = int(tok)
        if t == ivl.INVALID_TOKEN:
            raise ValueError("invalid (NaN/inf) logits")
        if t in stop:
            break
        out.append(t)
        seq.append(t)
    return out
