"""Input validation and normalisation shared by the reference ops and every backend wrapper.

One place decides what a valid call looks like, so the reference, the native kernels and the
public wrappers reject the same inputs with the same messages.
"""

from __future__ import annotations

import math
from typing import Any

import torch

LOGIT_DTYPES = (torch.float32, torch.bfloat16, torch.float16)


def check_logits(name: str, t: torch.Tensor) -> None:
    """Check a logits tensor is [B, V] with a supported float dtype."""
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor of logits [B, V], got {type(t).__name__}")
    if t.dim() != 2:
        raise ValueError(
            f"{name} must have shape [B, V] (2 dims), got {tuple(t.shape)}: "
            "flatten leading dims with .reshape(-1, V)"
        )
    if t.dtype not in LOGIT_DTYPES:
        raise TypeError(f"{name} must be float32, bfloat16 or float16 logits, got {t.dtype}")
    if t.shape[1] == 0:
        raise ValueError(f"{name} has an empty vocabulary dimension: {tuple(t.shape)}")


def map_tensors(vocab_map: Any) -> tuple[torch.Tensor, torch.Tensor] | None:
    """Return (index int64 [Vb], weight float32 [Vb]) from a map-like object, or None.

    Accepts None, an (index, weight) pair, or any object with ``.index`` and ``.weight``
    tensors (e.g. ``ivl.VocabMap``).
    """
    if vocab_map is None:
        return None
    if hasattr(vocab_map, "index") and hasattr(vocab_map, "weight"):
        index, weight = vocab_map.index, vocab_map.weight
    elif isinstance(vocab_map, (tuple, list)) and len(vocab_map) == 2:
        index, weight = vocab_map
    else:
        raise TypeError(
            "vocab_map must be None, an (index, weight) pair of tensors or an ivl.VocabMap, "
            f"got {type(vocab_map).__name__}"
        )
    if not isinstance(index, torch.Tensor) or index.dim() != 1:
        raise ValueError("vocab_map index must be a 1-D int64 tensor [V_base] (-1 = unmapped)")
    if index.dtype != torch.int64:
        raise TypeError(f"vocab_map index must be int64, got {index.dtype}")
    if weight is None:
        weight = torch.ones(index.shape, dtype=torch.float32, device=index.device)
    if not isinstance(weight, torch.Tensor) or weight.shape != index.shape:
        raise ValueError(
            f"vocab_map weight must be a float tensor shaped like index {tuple(index.shape)}"
        )
    return index, weight.to(torch.float32)


def check_merge_inputs(
    base: torch.Tensor,
    value: torch.Tensor | None,
    vocab_map: Any,
    vocab_limit: int | None,
) -> tuple[tuple[torch.Tensor, torch.Tensor] | None, int]:
    """Validate merge inputs; return the normalised map and the effective vocab_limit."""
    check_logits("base", base)
    vb = base.shape[1]
    vmap = map_tensors(vocab_map)
    if value is not None:
        check_logits("value", value)
        if value.shape[0] != base.shape[0]:
            raise ValueError(
                f"base and value must have the same number of rows, got {base.shape[0]} "
                f"and {value.shape[0]}"
            )
        if value.device != base.device:
            raise ValueError(f"base is on {base.device} but value is on {value.device}")
        vv = value.shape[1]
        if vmap is None and vv != vb:
            raise ValueError(
                f"vocabularies differ ({vv} value vs {vb} base columns) and no vocab map was "
                "given: build one with `ivl vocab build` or pass vocab_map="
            )
        if vmap is not None:
            index, _ = vmap
            if index.shape[0] != vb:
                raise ValueError(
                    f"vocab_map covers {index.shape[0]} base tokens but base has {vb} columns"
                )
            if index.device.type == "cpu" and index.numel():
                lo, hi = int(index.min()), int(index.max())
                if lo < -1 or hi >= vv:
                    raise ValueError(
                        f"vocab_map index values must lie in [-1, {vv - 1}] for a value "
                        f"vocabulary of {vv}, got range [{lo}, {hi}]"
                    )
            vmap = (vmap[0].to(base.device), vmap[1].to(base.device))
    if vocab_limit is None:
        vocab_limit = vb
    if not isinstance(vocab_limit, int) or not 0 < vocab_limit <= vb:
        raise ValueError(
            f"vocab_limit must be an int in [1, {vb}] (ids >= vocab_limit are never produced), "
            f"got {vocab_limit!r}"
        )
    return vmap, vocab_limit


def rows(
    x: float | int | torch.Tensor,
    n: int,
    dtype: torch.dtype,
    device: torch.device,
    name: str,
) -> torch.Tensor:
    """Broadcast a scalar or per-row tensor parameter to a [n] tensor of ``dtype``."""
    if isinstance(x, torch.Tensor):
        if x.dim() == 0:
            x = x.reshape(1)
        if x.dim() != 1 or x.shape[0] not in (1, n):
            raise ValueError(f"{name} must be a scalar or a [{n}] tensor, got {tuple(x.shape)}")
        if dtype == torch.int64 and x.is_floating_point():
            raise TypeError(f"{name} must be an integer tensor, got {x.dtype}")
        return x.to(device=device, dtype=dtype).expand(n)
    if isinstance(x, bool) or not isinstance(x, (int, float)):
        raise TypeError(f"{name} must be a number or a tensor, got {type(x).__name__}")
    if dtype == torch.int64:
        if not isinstance(x, int):
            raise TypeError(f"{name} must be an int, got {x!r}")
        if not -(2**63) <= x < 2**64:
            raise ValueError(f"{name} must fit in 64 bits, got {x}")
        x = x - 2**64 if x >= 2**63 else x  # keep the bit pattern of unsigned 64-bit seeds
    return torch.full((n,), x, dtype=dtype, device=device)


def _check(ok: torch.Tensor | bool, msg: str) -> None:
    if not bool(ok):
        raise ValueError(msg)


def sampling_rows(
    n: int,
    device: torch.device,
    *,
    temperature: float | torch.Tensor,
    top_k: int | torch.Tensor,
    top_p: float | torch.Tensor,
    min_p: float | torch.Tensor,
    seed: int | torch.Tensor,
    step: int | torch.Tensor,
) -> dict[str, torch.Tensor]:
    """Normalise and validate per-row sampling parameters.

    Values are checked when they live on the CPU (python numbers always do). Parameters already
    on an accelerator are trusted, to avoid a host sync per token: validate requests when they
    are admitted (``SamplingParams`` does) rather than on every step.
    """
    p = {
        "temperature": rows(temperature, n, torch.float32, device, "temperature"),
        "top_k": rows(top_k, n, torch.int64, device, "top_k"),
        "top_p": rows(top_p, n, torch.float32, device, "top_p"),
        "min_p": rows(min_p, n, torch.float32, device, "min_p"),
        "seed": rows(seed, n, torch.int64, device, "seed"),
        "step": rows(step, n, torch.int64, device, "step"),
    }
    if device.type == "cpu":
        t = p["temperature"]
        _check(
            torch.isfinite(t).all() and (t >= 0).all(),
            f"temperature must be finite and >= 0 (0 = greedy), got {t.tolist()}",
        )
        _check((p["top_k"] >= 0).all(), f"top_k must be >= 0 (0 = off), got {p['top_k'].tolist()}")
        tp = p["top_p"]
        _check(
            ((tp > 0) & (tp <= 1)).all(), f"top_p must be in (0, 1] (1 = off), got {tp.tolist()}"
        )
        mp = p["min_p"]
        _check(
            ((mp >= 0) & (mp <= 1)).all(), f"min_p must be in [0, 1] (0 = off), got {mp.tolist()}"
        )
    return p


def alpha_rows(alpha: float | torch.Tensor, n: int, device: torch.device) -> torch.Tensor:
    """Per-row value strength as fp32 [n]; must be finite."""
    if isinstance(alpha, (int, float)) and not isinstance(alpha, bool):
        if not math.isfinite(alpha):
            raise ValueError(f"alpha must be finite, got {alpha}")
        return torch.full((n,), alpha, dtype=torch.float32, device=device)
    a = rows(alpha, n, torch.float32, device, "alpha")
    if device.type == "cpu" and not torch.isfinite(a).all():
        raise ValueError(f"alpha must be finite, got {a.tolist()}")
    return a
