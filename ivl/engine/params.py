"""Per-request sampling settings and results.

``SamplingParams`` is validated once, when it is built, so the per-token path never re-checks
(``ivl.merge_sample`` trusts per-row tensors that live on an accelerator). ``seed=None`` means
"derive one from the request's index", which keeps a run reproducible without the caller
choosing seeds: the same prompts in the same order give the same samples.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field

_U64 = 2**64


@dataclass(frozen=True)
class SamplingParams:
    """How one request is decoded.

    Parameters
    ----------
    temperature : float
        Softmax temperature, >= 0; 0 is greedy (argmax; the filters are then ignored).
    top_k : int
        Keep the k most likely tokens (0 = off).
    top_p : float
        Nucleus sampling mass in (0, 1] (1 = off).
    min_p : float
        Keep tokens with p >= min_p * p_max, in [0, 1] (0 = off).
    alpha : float
        Value strength: z = z_base + alpha * z_value. 0 skips the value model.
    seed : int, optional
        64-bit seed of this request's random stream; None derives one from the request index.
    max_new_tokens : int
        Generation budget (>= 1).
    stop_token_ids : sequence of int
        Extra token ids that end generation (not included in the output).
    stop : sequence of str
        Stop strings; generation ends when the text contains one (it may span several tokens).
        The text is cut before the stop string.
    ignore_eos : bool
        Do not stop on the tokenizer's / model's end-of-sequence ids.
    logprobs : bool
        Return the chosen tokens' log-probabilities (of the merged distribution, T = 1).

    Examples
    --------
    >>> SamplingParams(temperature=0.7, top_p=0.9, seed=1).alpha
    1.0
    >>> SamplingParams(top_p=0)
    Traceback (most recent call last):
    ...
    ValueError: top_p must be in (0, 1] (1 = off), got 0
    """

    temperature: float = 1.0
    top_k: int = 0
    top_p: float = 1.0
    min_p: float = 0.0
    alpha: float = 1.0
    seed: int | None = None
    max_new_tokens: int = 128
    stop_token_ids: Sequence[int] = field(default=())
    stop: Sequence[str] = field(default=())
    ignore_eos: bool = False
    logprobs: bool = False

    def __post_init__(self) -> None:
        def number(name: str) -> float:
            x = getattr(self, name)
            if isinstance(x, bool) or not isinstance(x, (int, float)):
                raise TypeError(f"{name} must be a number, got {x!r}")
            if not math.isfinite(x):
                raise ValueError(f"{name} must be finite, got {x}")
            return float(x)

        def integer(name: str) -> int:
            x = getattr(self, name)
            if isinstance(x, bool) or not isinstance(x, int):
                raise TypeError(f"{name} must be an int, got {x!r}")
            return x

        if number("temperature") < 0:
            raise ValueError(f"temperature must be >= 0 (0 = greedy), got {self.temperature}")
        if integer("top_k") < 0:
            raise ValueError(f"top_k must be >= 0 (0 = off), got {self.top_k}")
        if not 0 < number("top_p") <= 1:
            raise ValueError(f"top_p must be in (0, 1] (1 = off), got {self.top_p}")
        if not 0 <= number("min_p") <= 1:
            raise ValueError(f"min_p must be in [0, 1] (0 = off), got {self.min_p}")
        number("alpha")
        if self.seed is not None and not -(2**63) <= integer("seed") < _U64:
            raise ValueError(f"seed must fit in 64 bits, got {self.seed}")
        if integer("max_new_tokens") < 1:
            raise ValueError(f"max_new_tokens must be >= 1, got {self.max_new_tokens}")
        if isinstance(self.stop, str):  # a bare string is one stop string, not its characters
            object.__setattr__(self, "stop", (self.stop,))
        stop = tuple(self.stop)
        if not all(isinstance(s, str) and s for s in stop):
            raise ValueError(f"stop must be a list of non-empty strings, got {self.stop!r}")
        ids = tuple(self.stop_token_ids)
        if not all(isinstance(t, int) and not isinstance(t, bool) and t >= 0 for t in ids):
            raise ValueError(
                f"stop_token_ids must be non-negative ints, got {self.stop_token_ids!r}"
            )
        object.__setattr__(self, "stop", stop)
        object.__setattr__(self, "stop_token_ids", ids)


def derive_seed(index: int, base_seed: int = 0) -> int:
    """A well-mixed 64-bit seed (as a signed int64 bit pattern) for request ``index``.

    SplitMix64 finaliser of ``base_seed + index``: neighbouring indices get unrelated streams.
    """
    z = (base_seed + (index + 1) * 0x9E3779B97F4A7C15) % _U64
    z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) % _U64
    z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) % _U64
    z ^= z >> 31
    return z - _U64 if z >= 2**63 else z


@dataclass
class Result:
    """The outcome of one request.

    ``finish_reason`` is ``"stop"`` (a stop token or string), ``"length"`` (max_new_tokens or
    the cache is full) or ``"error"`` (then ``error`` says why; other requests are unaffected).
    """

    request_id: int
    prompt: str | list[int] | list[dict]
    text: str = ""
    token_ids: list[int] = field(default_factory=list)
    logprobs: list[float] | None = None
    finish_reason: str | None = None
    error: str | None = None
    prompt_tokens: int = 0
    seed: int | None = None

    @property
    def ok(self) -> bool:
        return self.error is None


@dataclass
class StreamEvent:
    """One streamed increment: unpacks as ``(request_id, token, text_delta)``.

    ``token`` is None on a request's last event (which may still carry held-back text);
    ``result`` is set on that last event.
    """

    request_id: int
    token: int | None
    text_delta: str
    result: Result | None = None

    def __iter__(self):
        return iter((self.request_id, self.token, self.text_delta))
