"""Backend choice: explicit, logged, and IVL_BACKEND forces one or raises."""

from __future__ import annotations

import logging

import pytest
import torch

import ivl
from ivl.ops import _native, backend, reference


@pytest.fixture
def fresh_choice(monkeypatch):
    """Clear cached choices before and after, so each test sees its own environment."""
    monkeypatch.delenv("IVL_BACKEND", raising=False)
    backend._choose.cache_clear()
    yield monkeypatch
    backend._choose.cache_clear()


def test_auto_choice_prefers_native_and_logs_once(fresh_choice, caplog):
    with caplog.at_level(logging.INFO, logger="ivl"):
        first = backend.choose("merge_logits", torch.device("cpu"))
        backend.choose("merge_logits", torch.device("cpu"))
    assert first == ("cpu" if _native.AVAILABLE else "torch")
    assert sum("merge_logits on cpu uses backend" in r.message for r in caplog.records) == 1


@pytest.fixture
def reference_only_op(fresh_choice):
    """An op only the torch backend implements (every real op has native kernels by now)."""
    backend.register("_reference_only", "torch", reference.merge_logits)
    yield "_reference_only"
    backend._IMPLS.pop("_reference_only")


def test_op_without_native_kernel_uses_reference_and_says_why(reference_only_op, caplog):
    with caplog.at_level(logging.INFO, logger="ivl"):
        assert backend.choose(reference_only_op, torch.device("cpu")) == "torch"
    (msg,) = [r.message for r in caplog.records if f"{reference_only_op} on cpu" in r.message]
    assert "passed over: cpu:" in msg


def test_forced_backend(fresh_choice):
    fresh_choice.setenv("IVL_BACKEND", "torch")
    assert backend.choose("merge_logits", torch.device("cpu")) == "torch"
    base, value = torch.randn(3, 50), torch.randn(3, 50)
    assert torch.equal(ivl.merge_logits(base, value), reference.merge_logits(base, value))


@pytest.mark.parametrize(
    ("forced", "op", "match"),
    [
        ("bogus", "merge_logits", "is not a backend"),
        ("triton", "merge_logits", "IVL_BACKEND=triton cannot run merge_logits on cpu"),
        ("cpu", "_reference_only", "no _reference_only kernel yet"),
    ],
)
def test_forced_backend_raises_instead_of_falling_back(
    reference_only_op, fresh_choice, forced, op, match
):
    fresh_choice.setenv("IVL_BACKEND", forced)
    with pytest.raises(RuntimeError, match=match):
        backend.choose(op, torch.device("cpu"))


def test_missing_extension_falls_back_to_reference_but_forcing_raises(fresh_choice):
    fresh_choice.setattr(backend, "unavailable", lambda: {"cpu": "ivl._C is not built"})
    assert backend.choose("merge_logits", torch.device("cpu")) == "torch"
    fresh_choice.setenv("IVL_BACKEND", "cpu")
    with pytest.raises(RuntimeError, match=r"ivl\._C is not built"):
        backend.choose("merge_logits", torch.device("cpu"))


def test_public_ops_match_reference_on_the_chosen_backend(fresh_choice):
    torch.manual_seed(0)
    base, value = torch.randn(4, 300, dtype=torch.bfloat16), torch.randn(4, 200)
    index = torch.randint(-1, 200, (300,))
    kw = dict(
        alpha=torch.tensor([1.0, 0.0, 0.5, 2.0]),
        vocab_map=(index, torch.rand(300)),
        fill=-1.0,
        vocab_limit=290,
    )
    assert torch.equal(
        ivl.merge_logits(base, value, **kw), reference.merge_logits(base, value, **kw)
    )
    torch.testing.assert_close(
        ivl.merged_log_softmax(base, value, **kw), reference.merged_log_softmax(base, value, **kw)
    )
    tokens, lp = ivl.merge_sample(base, value, temperature=0.7, top_p=0.9, seed=3, **kw)
    ref_tokens, ref_lp = reference.merge_sample(
        base, value, temperature=0.7, top_p=0.9, seed=3, **kw
    )
    assert torch.equal(tokens, ref_tokens)
    torch.testing.assert_close(lp, ref_lp)


def test_public_ops_validate_like_the_reference(fresh_choice):
    with pytest.raises(ValueError, match="ivl vocab build"):
        ivl.merge_logits(torch.randn(2, 5), torch.randn(2, 6))
    with pytest.raises(ValueError, match="temperature"):
        ivl.merge_sample(torch.randn(2, 5), temperature=-1.0)
