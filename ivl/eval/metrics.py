"""Answer extraction, scorers and confidence intervals (pure Python, no torch)."""

from __future__ import annotations

import importlib
import math
import re
from collections.abc import Callable

Scorer = Callable[[str, str], float]  # (prediction text, reference) -> score in [0, 1]

_NUMBER = re.compile(r"-?\$?\d[\d,]*(?:\.\d+)?")


def normalize_number(text: str) -> str | None:
    """'$1,234.50' -> '1234.5', '7.0' -> '7'; None when ``text`` holds no number."""
    m = _NUMBER.search(text)
    if m is None:
        return None
    s = m.group(0).replace("$", "").replace(",", "")
    try:
        x = float(s)
    except ValueError:
        return None
    if x == int(x) and abs(x) < 2**53:
        return str(int(x))
    return repr(x)


def extract_answer(text: str) -> str | None:
    """The final answer of a worked solution: the first number after the last ``####``,
    else the last number in the text (normalised by :func:`normalize_number`)."""
    if "####" in text:
        found = normalize_number(text.rsplit("####", 1)[1])
        if found is not None:
            return found
    numbers = _NUMBER.findall(text)
    return normalize_number(numbers[-1]) if numbers else None


def numeric_match(prediction: str, reference: str) -> float:
    """1.0 when the extracted final answer equals the reference number."""
    ref = normalize_number(str(reference))
    if ref is None:
        raise ValueError(f"reference {reference!r} holds no number; use the exact scorer instead")
    return float(extract_answer(prediction) == ref)


def exact_match(prediction: str, reference: str) -> float:
    """1.0 when the stripped texts are equal."""
    return float(prediction.strip() == str(reference).strip())


SCORERS: dict[str, Scorer] = {"exact": exact_match, "numeric": numeric_match}


def resolve_scorer(spec: str | Scorer, *, allow_import: bool = False) -> Scorer:
    """A scorer from a callable, a built-in name, or ``module:function`` (only with
    ``allow_import=True``: importing runs that module's code)."""
    if callable(spec):
        return spec
    if spec in SCORERS:
        return SCORERS[spec]
    if ":" in spec:
        if not allow_import:
            raise ValueError(
                f"scorer {spec!r} would import and run Python code; pass --allow-custom-scorer "
                "to allow it"
            )
        module, _, name = spec.partition(":")
        try:
            fn = getattr(importlib.import_module(module), name)
        except (ImportError, AttributeError) as e:
            raise ValueError(f"cannot load scorer {spec!r}: {e}") from None
        if not callable(fn):
            raise ValueError(f"scorer {spec!r} is not callable")
        return fn
    raise ValueError(
        f"unknown scorer {spec!r}; choose one of {', '.join(SCORERS)} or module:function"
    )


def wilson_interval(successes: float, n: int, z: float = 1.959964) -> tuple[float, float]:
    """Wilson score interval of a binomial proportion (95% by default); (nan, nan) if n = 0."""
    if n <= 0:
        return float("nan"), float("nan")
    p = successes / n
    denom = 1 + z * z / n
    centre = (p + z * z / (2 * n)) / denom
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / denom
    return max(0.0, centre - half), min(1.0, centre + half)
