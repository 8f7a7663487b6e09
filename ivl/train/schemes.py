"""How the value network sees its input (METHOD.md section 3) and how models are taken apart.

- ``residual``: the value network reads the token ids only (base and value independent).
- ``cascade``: input embeddings = E_value[ids] + softmax(z_base) @ E_value.
- ``cascade_no_text``: input embeddings = softmax(z_base) @ E_value only.

The base distribution at position t (which describes token t + 1) is fed at position t, so the
value network stays causal. ``softmax(z_base) @ E_value`` is computed in chunks over tokens under
activation checkpointing, so no ``[tokens, V]`` tensor is kept for backward. Models that scale
their embeddings (Gemma: ``embed_scale``) get the same scale on the expected embedding.
"""

from __future__ import annotations

import torch
from torch.utils.checkpoint import checkpoint

SCHEMES = ("residual", "cascade", "cascade_no_text")


def check_scheme(scheme: str) -> str:
    if scheme not in SCHEMES:
        raise ValueError(f"unknown scheme {scheme!r}; choose one of {', '.join(SCHEMES)}")
    return scheme


def head_of(model) -> tuple[torch.Tensor, torch.Tensor | None, float | None]:
    """(weight [V, D], bias [V] or None, final logit softcap or None) of a causal LM's head."""
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    if head is None or not hasattr(model, "get_decoder"):
        raise ValueError(
            f"{type(model).__name__} is not a causal LM with an output head "
            f"(AutoModelForCausalLM); ivl needs a decoder-only LM"
        )
    cap = getattr(model.config, "final_logit_softcapping", None)
    return head.weight, getattr(head, "bias", None), cap


def hidden_states(model, input_ids=None, attention_mask=None, inputs_embeds=None):
    """Final hidden states [B, L, D] (after the final norm; the LM head is not applied)."""
    out = model.get_decoder()(
        input_ids=input_ids,
        attention_mask=attention_mask,
        inputs_embeds=inputs_embeds,
        use_cache=False,
    )
    return out.last_hidden_state


def _expected_embedding_chunk(hb, w_base, b_base, cap, emb_weight):
    z = (hb @ w_base.to(hb.dtype).t()).float()
    if b_base is not None:
        z = z + b_base.float()
    if cap:
        z = torch.tanh(z / cap) * cap
    p = torch.softmax(z, dim=-1)
    return p.to(emb_weight.dtype) @ emb_weight


def expected_embedding(
    h_base: torch.Tensor,  # [B, L, D_base]
    base,
    value,
    *,
    chunk_size: int | None = None,
) -> torch.Tensor:  # [B, L, D_value]
    """softmax(z_base) @ E_value (times the value's embedding scale), chunked and checkpointed."""
    w_base, b_base, cap = head_of(base)
    emb = value.get_input_embeddings()
    vocab = emb.weight.shape[0]
    if w_base.shape[0] != vocab:
        raise ValueError(f"vocabulary sizes differ (base {w_base.shape[0]} vs value {vocab})")
    if chunk_size is None:
        chunk_size = max(1, (1 << 24) // vocab)
    hb = h_base.detach().reshape(-1, h_base.shape[-1])
    parts = []
    for s in range(0, hb.shape[0], chunk_size):
        parts.append(
            checkpoint(
                _expected_embedding_chunk,
                hb[s : s + chunk_size],
                w_base.detach(),
                None if b_base is None else b_base.detach(),
                cap,
                emb.weight,
                use_reentrant=False,
            )
        )
    out = torch.cat(parts).reshape(*h_base.shape[:-1], -1)
    scale = getattr(emb, "embed_scale", None)
    if scale is not None:
        out = out * scale.to(out.dtype)
    return out


def value_hidden_states(value, scheme, input_ids, attention_mask, h_base=None, base=None):
    """The value network's final hidden states [B, L, D_value] under ``scheme``."""
    if scheme == "residual":
        return hidden_states(value, input_ids, attention_mask)
    if h_base is None or base is None:
        raise ValueError(f"scheme {scheme!r} needs the base hidden states")
    x = expected_embedding(h_base, base, value)
    if scheme == "cascade":
        x = value.get_input_embeddings()(input_ids) + x.to(
            value.get_input_embeddings().weight.dtype
        )
    return hidden_states(value, None, attention_mask, inputs_embeds=x)
