"""Chunked merged loss vs the naive full-logits loss; data rendering, masking and errors.

Tolerance: fp32 throughout; the chunked path sums per-token terms in a different order (fp64
accumulation of per-chunk sums) from the naive mean, so values and gradients are compared with
rtol=1e-5, atol=1e-6 (a few fp32 ulps at these magnitudes).
"""

from __future__ import annotations

import json

import pytest
import torch

from ivl.models.tiny import tiny_model
from ivl.train import data as D
from ivl.train.loss import even_chunk, merged_loss, naive_merged_loss

RTOL, ATOL = 1e-5, 1e-6


@pytest.fixture(scope="module")
def gpt2_tok():
    from ivl.models.tiny import load_real_tokenizer

    return load_real_tokenizer("gpt2")


@pytest.fixture(scope="module")
def smol_tok():
    from ivl.models.tiny import load_real_tokenizer

    return load_real_tokenizer("smollm2")


@pytest.fixture(scope="module")
def pair():
    base, tok = tiny_model("llama", "gpt2", seed=1)
    value, _ = tiny_model("qwen2", "gpt2", seed=2, hidden_size=32, num_hidden_layers=1)
    return base, value, tok


def _hidden(model, ids, mask):
    return model.get_decoder()(input_ids=ids, attention_mask=mask).last_hidden_state


@pytest.mark.parametrize("masked", [False, True])
@pytest.mark.parametrize("lam", [0.0, 1.0, 0.3])
@pytest.mark.parametrize("chunk", [1, 7, None])
def test_chunked_matches_naive(pair, masked, lam, chunk):
    base, value, tok = pair
    value.zero_grad()
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(0, len(tok), (3, 11), generator=g)
    mask = torch.ones_like(ids)
    mask[1, 8:] = 0
    labels = ids.clone()
    labels[:, :4] = -100
    labels[1, 8:] = -100
    labels[2, 5:7] = -100

    with torch.no_grad():
        hb = _hidden(base, ids, mask)
    hv = _hidden(value, ids, mask)
    loss, parts = merged_loss(
        hb,
        base.lm_head.weight,
        hv,
        value.lm_head.weight,
        labels,
        lam=lam,
        masked=masked,
        attention_mask=mask,
        chunk_size=chunk,
    )
    loss.backward()
    got = {n: p.grad.clone() for n, p in value.named_parameters()}
    value.zero_grad()

    with torch.no_grad():
        zb = base(input_ids=ids, attention_mask=mask).logits
    zv = value(input_ids=ids, attention_mask=mask).logits
    ref = naive_merged_loss(zb, zv, labels, lam=lam, masked=masked, attention_mask=mask)
    ref.backward()
    torch.testing.assert_close(loss, ref, rtol=RTOL, atol=ATOL)
    for n, p in value.named_parameters():
        torch.testing.assert_close(got[n], p.grad, rtol=RTOL, atol=ATOL, msg=n)
    assert parts.n_ce == int((labels[:, 1:] != -100).sum())
    assert parts.n_penalty == (parts.n_ce if masked else int(mask.sum()))


def test_even_chunks():
    """Rows split into as few chunks as the limit allows, of near-equal lengths."""
    assert even_chunk(128, 110) == 64  # two chunks of 64, not 110 + 18
    assert even_chunk(128, 220) == 128
    assert even_chunk(1024, 220) == 205  # five chunks
    assert even_chunk(7, 1) == 1 and even_chunk(0, 50) == 50
    for rows in range(1, 60):
        for limit in range(1, 20):
            c = even_chunk(rows, limit)
            assert c <= limit and -(-rows // c) == -(-rows // limit)


def test_no_supervised_rows_gives_zero_gradients():
    """No row carries a loss term (lam = 0, nothing supervised): zero gradients, not None."""
    g = torch.Generator().manual_seed(5)
    hb = torch.randn(1, 4, 8, generator=g)
    hv = torch.randn(1, 4, 6, generator=g, requires_grad=True)
    wb = torch.randn(30, 8, generator=g)
    wv = torch.randn(30, 6, generator=g, requires_grad=True)
    labels = torch.full((1, 4), -100)
    loss, parts = merged_loss(hb, wb, hv, wv, labels, lam=0.0)
    loss.backward()
    assert float(loss) == 0.0 and parts.n_ce == 0
    assert torch.count_nonzero(hv.grad) == 0 and torch.count_nonzero(wv.grad) == 0
    assert wv.grad.shape == wv.shape


def test_backward_scaled_and_once():
    """Upstream gradients other than 1 scale the gradients; a second backward is refused."""
    g = torch.Generator().manual_seed(6)
    hb = torch.randn(2, 5, 8, generator=g)
    hv = torch.randn(2, 5, 6, generator=g, requires_grad=True)
    wb = torch.randn(40, 8, generator=g)
    wv = torch.randn(40, 6, generator=g, requires_grad=True)
    labels = torch.randint(0, 40, (2, 5), generator=g)
    loss, _ = merged_loss(hb, wb, hv, wv, labels, chunk_size=3)
    want = torch.autograd.grad(loss, (hv, wv), retain_graph=True)
    with pytest.raises(RuntimeError, match="one backward pass per forward"):
        loss.backward()
    loss, _ = merged_loss(hb, wb, hv, wv, labels, chunk_size=3)
    got = torch.autograd.grad(3 * loss, (hv, wv))
    torch.testing.assert_close(got[0], 3 * want[0])
    torch.testing.assert_close(got[1], 3 * want[1])
    loss, _ = merged_loss(hb, wb, hv, wv, labels, chunk_size=3)
    (loss + loss.detach()).backward()  # grad 1 through a sum: buffers handed over as they are
    torch.testing.assert_close(hv.grad, want[0])
    torch.testing.assert_close(wv.grad, want[1])


def test_chunked_loss_never_holds_full_logits():
    """Peak allocation (torch CPU allocator, via the profiler) stays far below one [N, V] tensor."""
    from benchmarks.bench_train import peak_alloc_mb

    n, v, d, chunk = 512, 32768, 8, 32
    g = torch.Generator().manual_seed(7)
    hb = torch.randn(1, n, d, generator=g)
    hv = torch.randn(1, n, d, generator=g, requires_grad=True)
    wb = torch.randn(v, d, generator=g)
    wv = torch.randn(v, d, generator=g, requires_grad=True)
    labels = torch.randint(0, v, (1, n), generator=g)
    full = n * v * 4 / 2**20  # one fp32 [N, V] tensor: 64 MiB

    def chunked():
        merged_loss(hb, wb, hv, wv, labels, chunk_size=chunk)[0].backward()

    def naive():
        naive_merged_loss(hb @ wb.t(), hv @ wv.t(), labels).backward()

    peak_naive = peak_alloc_mb(naive)
    peak_chunked = peak_alloc_mb(chunked)
    assert peak_naive >= 2 * full  # the probe sees the two logit tensors of the naive loss
    # grads of hv and wv (1 MiB) + a few [chunk, V] fp32 buffers (4 MiB each)
    assert peak_chunked < full / 2, (peak_chunked, peak_naive)


def test_masked_and_unmasked_penalty_differ():
    g = torch.Generator().manual_seed(3)
    hb, hv = torch.randn(2, 6, 8, generator=g), torch.randn(2, 6, 8, generator=g)
    wb, wv = torch.randn(50, 8, generator=g), torch.randn(50, 8, generator=g)
    labels = torch.randint(0, 50, (2, 6), generator=g)
    labels[:, :3] = -100
    zv = hv @ wv.t()
    # penalty only (lam huge relative to CE is not needed: compare the penalty parts directly)
    _, pu = merged_loss(hb, wb, hv, wv, labels, masked=False)
    _, pm = merged_loss(hb, wb, hv, wv, labels, masked=True)
    per_pos = zv.abs().mean(-1)
    sup = labels.roll(-1, 1) != -100
    sup[:, -1] = False
    assert pu.penalty_sum / pu.n_penalty == pytest.approx(per_pos.mean().item(), rel=1e-5)
    assert pm.penalty_sum / pm.n_penalty == pytest.approx(per_pos[sup].mean().item(), rel=1e-5)


def test_softcap_and_bias_gradients():
    g = torch.Generator().manual_seed(4)
    hb = torch.randn(2, 5, 8, generator=g)
    hv = torch.randn(2, 5, 6, generator=g, requires_grad=True)
    wb, bb = torch.randn(40, 8, generator=g), torch.randn(40, generator=g)
    wv = torch.randn(40, 6, generator=g, requires_grad=True)
    bv = torch.randn(40, generator=g, requires_grad=True)
    labels = torch.randint(0, 40, (2, 5), generator=g)
    kw = dict(b_base=bb, b_value=bv, softcap_base=3.0, softcap_value=2.0, chunk_size=3)
    loss, _ = merged_loss(hb, wb, hv, wv, labels, **kw)
    got = torch.autograd.grad(loss, (hv, wv, bv))
    zb = torch.tanh((hb @ wb.t() + bb) / 3.0) * 3.0
    zv = torch.tanh((hv @ wv.t() + bv) / 2.0) * 2.0
    ref = naive_merged_loss(zb, zv, labels)
    want = torch.autograd.grad(ref, (hv, wv, bv))
    torch.testing.assert_close(loss, ref, rtol=RTOL, atol=ATOL)
    for a, b in zip(got, want, strict=True):
        torch.testing.assert_close(a, b, rtol=RTOL, atol=ATOL)


def test_explicit_denominators_scale_loss():
    g = torch.Generator().manual_seed(5)
    hb, hv = torch.randn(1, 4, 8, generator=g), torch.randn(1, 4, 8, generator=g)
    w = torch.randn(30, 8, generator=g)
    labels = torch.randint(0, 30, (1, 4), generator=g)
    a, _ = merged_loss(hb, w, hv, w, labels)
    b, _ = merged_loss(hb, w, hv, w, labels, ce_denominator=6, penalty_denominator=8)
    assert b.item() == pytest.approx(a.item() / 2, rel=1e-6)


# ----------------------------------------------------------------------------------------------
# data


def _decode_supervised(tok, ex):
    return tok.decode([t for t in ex.labels if t != -100])


def test_prompt_response_plain_template(gpt2_tok):
    (ex,) = D.load_examples([{"prompt": "What is 2+2?", "response": "It is 4."}], gpt2_tok)
    assert _decode_supervised(gpt2_tok, ex) == " It is 4.<|endoftext|>"  # Ġ glued
    assert gpt2_tok.decode(ex.input_ids).startswith("User: What is 2+2?\n\nAssistant: It is 4.")
    assert len(ex.labels) == len(ex.input_ids)


def test_messages_chat_template(smol_tok):
    rec = {
        "messages": [
            {"role": "user", "content": "Hi"},
            {"role": "assistant", "content": "Hello!"},
            {"role": "user", "content": "Bye"},
            {"role": "assistant", "content": "See you."},
        ]
    }
    (ex,) = D.load_examples([rec], smol_tok)
    sup = _decode_supervised(smol_tok, ex)
    assert sup == "Hello!<|im_end|>\nSee you.<|im_end|>\n"
    assert "Hi" in smol_tok.decode(ex.input_ids)


def test_sharegpt_style(gpt2_tok):
    rec = {"conversations": [{"from": "human", "value": "a"}, {"from": "gpt", "value": "b"}]}
    (ex,) = D.load_examples([rec], gpt2_tok)
    assert _decode_supervised(gpt2_tok, ex) == " b<|endoftext|>"


def test_truncation_policies(gpt2_tok):
    rec = {"prompt": "word " * 30, "response": "yes " * 10}
    n = len(D.load_examples([rec], gpt2_tok, max_length=None)[0].input_ids)
    (right,) = D.load_examples([rec, rec], gpt2_tok, max_length=n - 5)[:1]
    assert len(right.input_ids) == n - 5
    (left,) = D.load_examples([rec], gpt2_tok, max_length=12, truncation="left")
    assert len(left.input_ids) == 12 and left.n_supervised > 0
    short = {"prompt": "a", "response": "b"}
    kept = D.load_examples([rec, short], gpt2_tok, max_length=12, truncation="drop")
    assert len(kept) == 1
    with pytest.raises(ValueError, match=r"item 0.*max_length=12"):
        D.load_examples([rec], gpt2_tok, max_length=12, truncation="error")


def test_bad_data_errors(tmp_path, gpt2_tok):
    path = tmp_path / "d.jsonl"
    good = json.dumps({"prompt": "p", "response": "r"})
    cases = {
        json.dumps({"prompt": "p"}): "line 2 .*missing field.*'response'",
        json.dumps({"prompt": "p", "response": "  "}): "line 2 .*empty 'response'",
        "{not json": "line 2 .*invalid JSON",
        json.dumps({"messages": [{"role": "user", "content": "x"}]}): "line 2 .*no assistant",
        json.dumps({"messages": [{"role": "bot", "content": "x"}]}): "line 2 .*role 'bot'",
        json.dumps(
            {
                "messages": [
                    {"role": "user", "content": "x"},
                    {"role": "assistant", "content": " "},
                ]
            }
        ): "line 2 .*every assistant turn is empty",
    }
    for line, pattern in cases.items():
        path.write_text(good + "\n" + line + "\n")
        with pytest.raises(ValueError, match=pattern):
            D.load_examples(path, gpt2_tok)
    # everything supervised is cut off by right truncation
    path.write_text(good + "\n" + json.dumps({"prompt": "w " * 40, "response": "r"}) + "\n")
    with pytest.raises(ValueError, match=r"line 2 .*no supervised.*after truncation"):
        D.load_examples(path, gpt2_tok, max_length=10)
    with pytest.raises(FileNotFoundError):
        D.load_examples(tmp_path / "nope.jsonl", gpt2_tok)
    with pytest.raises(ValueError, match="truncation"):
        D.load_examples([], gpt2_tok, truncation="middle")


def test_collate_and_fingerprint(gpt2_tok):
    exs = D.load_examples(
        [{"prompt": "a", "response": "b"}, {"prompt": "a longer one", "response": "c d"}],
        gpt2_tok,
    )
    ids, mask, labels = D.collate(exs, D.pad_id_of(gpt2_tok))
    assert ids.shape == mask.shape == labels.shape
    assert mask[0].sum() == len(exs[0].input_ids)
    assert (labels[mask == 0] == -100).all()
    assert D.fingerprint(exs) != D.fingerprint(exs[:1])
