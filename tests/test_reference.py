"""The pure-PyTorch reference ops pinned on hand-checked cases: the spec every kernel must match."""

from __future__ import annotations

import math

import pytest
import torch

from ivl.ops import reference as R

INF, NAN = float("inf"), float("nan")


def words(*xs: int) -> tuple[torch.Tensor, ...]:
    return tuple(torch.tensor([x], dtype=torch.int64) for x in xs)


# ---------------------------------------------------------------------------------------------
# Random numbers
# ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("counter", "key", "expected"),
    [  # Random123 known-answer vectors for philox4x32, 10 rounds
        ((0, 0, 0, 0), (0, 0), (0x6627E8D5, 0xE169C58D, 0xBC57AC4C, 0x9B00DBD8)),
        ((0xFFFFFFFF,) * 4, (0xFFFFFFFF,) * 2, (0x408F276D, 0x41C83B0E, 0xA20BC7C6, 0x6D5451FD)),
        (
            (0x243F6A88, 0x85A308D3, 0x13198A2E, 0x03707344),
            (0xA4093822, 0x299F31D0),
            (0xD16CFE09, 0x94FDCCEB, 0x5001E420, 0x24126EA1),
        ),
    ],
)
def test_philox_known_answers(counter, key, expected):
    out = R.philox4x32_10(words(*counter), words(*key))
    assert tuple(int(o) for o in out) == expected


def test_uniform_stream_layout():
    """Draw v of a row is lane v & 3 of block v >> 2, keyed by the seed, counted by the step."""
    seed, step = -5, 2**40 + 3  # negative seeds and steps past 32 bits use all 64 bits
    w = R.philox_uniform(torch.tensor([seed]), torch.tensor([step]), 11)[0]
    s, t = seed & (2**64 - 1), step
    key = words(s & 0xFFFFFFFF, s >> 32)
    for v in range(11):
        x = R.philox4x32_10(words(v >> 2, 0, t & 0xFFFFFFFF, t >> 32), key)[v & 3]
        expected = torch.tensor(float(x), dtype=torch.float32) * 2.0**-32 + 2.0**-33
        assert w[v].item() == expected.item()


def test_uniform_edges_and_range():
    x = torch.tensor([0, 0xFFFFFFFF], dtype=torch.int64)
    w = x.to(torch.float32) * 2.0**-32 + 2.0**-33  # the documented map
    assert w[0].item() == 2.0**-33 and w[1].item() == 1.0
    u = R.philox_uniform(torch.arange(64), torch.zeros(64, dtype=torch.int64), 4096)
    assert (u > 0).all() and (u <= 1).all()
    assert abs(u.double().mean().item() - 0.5) < 0.002  # 262k draws: sd of the mean ~ 0.0006
    hist = torch.histc(u, bins=16, min=0, max=1) / u.numel()
    assert (hist - 1 / 16).abs().max() < 0.003


def test_stream_depends_only_on_own_seed_and_step():
    seeds = torch.tensor([1, 2, 3, 2**63 - 1, -(2**63)])
    steps = torch.tensor([0, 1, 2**32, 5, 9])
    batch = R.philox_uniform(seeds, steps, 100)
    for i in range(5):
        alone = R.philox_uniform(seeds[i : i + 1], steps[i : i + 1], 100)
        assert torch.equal(batch[i : i + 1], alone)
    assert not torch.equal(batch[0], batch[1])
    nxt = R.philox_uniform(seeds, steps + 1, 100)
    assert not torch.equal(batch, nxt)


def test_gumbel_noise_is_finite_and_standard():
    g = R.gumbel_noise(torch.arange(32), torch.zeros(32, dtype=torch.int64), 8192)
    assert torch.isfinite(g).all()
    assert abs(g.double().mean().item() - 0.5772) < 0.01  # Euler-Mascheroni
    assert abs(g.double().var().item() - math.pi**2 / 6) < 0.03


# ---------------------------------------------------------------------------------------------
# Merge
# ---------------------------------------------------------------------------------------------
def test_merge_no_map_per_row_alpha():
    base = torch.tensor([[1.0, 2.0, 3.0], [0.0, 0.0, 0.0]])
    value = torch.tensor([[1.0, -1.0, 0.5], [2.0, 4.0, 8.0]])
    out = R.merge_logits(base, value, alpha=torch.tensor([1.0, 0.25]))
    assert torch.equal(out, torch.tensor([[2.0, 1.0, 3.5], [0.5, 1.0, 2.0]]))
    assert out.dtype == torch.float32


def test_merge_alpha_zero_and_no_value_return_base_exactly():
    base = torch.tensor([[1.5, -INF, 3.0]])
    value = torch.tensor([[INF, NAN, -INF]])
    assert torch.equal(R.merge_logits(base, value, alpha=0.0), base)
    assert torch.equal(R.merge_logits(base, None), base)
    mixed = R.merge_logits(base.repeat(2, 1), value.repeat(2, 1), alpha=torch.tensor([0.0, 1.0]))
    assert torch.equal(mixed[0], base[0])
    assert torch.isnan(mixed[1, 1]) and mixed[1, 0] == INF and mixed[1, 2] == -INF


def test_merge_rounds_product_before_add():
    """s * value is rounded to fp32 before the add: an FMA would give 2^-46 here, not 0."""
    e = 2.0**-23
    base = torch.tensor([[-(1 + 2 * e)]])
    out = R.merge_logits(base, torch.tensor([[1 + e]]), alpha=1 + e)
    assert out.item() == 0.0


def test_merge_with_map_weights_fill_and_limit():
    base = torch.tensor([[10.0, 20.0, 30.0, 40.0, 50.0]])
    value = torch.tensor([[1.0, 2.0, 3.0]])
    index = torch.tensor([2, 0, -1, 1, 0])
    weight = torch.tensor([1.0, 0.5, 0.7, 0.0, 1.0])
    out = R.merge_logits(
        base, value, alpha=2.0, vocab_map=(index, weight), fill=-1.5, vocab_limit=4
    )
    # b0: 10 + 2*1*3; b1: 20 + 2*0.5*1; b2 unmapped: 30 + 2*(-1.5); b3 weight 0: 40; b4 masked
    assert torch.equal(out, torch.tensor([[16.0, 21.0, 27.0, 40.0, -INF]]))


def test_merge_map_object_and_default_weight():
    class Map:
        index = torch.tensor([1, 0])
        weight = torch.tensor([1.0, 1.0])

    base, value = torch.zeros(1, 2), torch.tensor([[3.0, 4.0]])
    assert torch.equal(R.merge_logits(base, value, vocab_map=Map()), torch.tensor([[4.0, 3.0]]))
    same = R.merge_logits(base, value, vocab_map=(Map.index, None))
    assert torch.equal(same, torch.tensor([[4.0, 3.0]]))


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_merge_low_precision_inputs_accumulate_in_fp32(dtype):
    base = torch.tensor([[1000.0, 1.0]], dtype=dtype)
    value = torch.tensor([[0.125, 0.5]], dtype=dtype)
    out = R.merge_logits(base, value, alpha=0.5)
    assert out.dtype == torch.float32
    assert torch.equal(out, base.float() + 0.5 * value.float())


def test_merged_log_softmax_normalises():
    base, value = torch.randn(3, 17), torch.randn(3, 17)
    lp = R.merged_log_softmax(base, value, alpha=0.7)
    torch.testing.assert_close(lp.exp().sum(-1), torch.ones(3))
    torch.testing.assert_close(lp, torch.log_softmax(base + 0.7 * value, -1))


# ---------------------------------------------------------------------------------------------
# Filters
# ---------------------------------------------------------------------------------------------
def keep(logits, top_k=0, top_p=1.0, min_p=0.0):
    z = torch.tensor([logits], dtype=torch.float32)
    mask = R.keep_mask(z, torch.tensor([top_k]), torch.tensor([top_p]), torch.tensor([min_p]))
    return set(torch.nonzero(mask[0]).flatten().tolist())


def test_top_k_keeps_k_largest_and_ties():
    z = [0.0, 3.0, 1.0, 2.0, 2.0]
    assert keep(z, top_k=1) == {1}
    assert keep(z, top_k=2) == {1, 3, 4}  # tie at the boundary: both kept
    assert keep(z, top_k=0) == keep(z, top_k=5) == keep(z, top_k=99) == set(range(5))


def test_top_p_smallest_set_reaching_p():
    z = torch.log(torch.tensor([0.05, 0.5, 0.15, 0.3])).tolist()
    # sorted probs 0.5, 0.3, 0.15, 0.05; mass strictly above: 0, 0.5, 0.8, 0.95
    assert keep(z, top_p=0.5) == {1}
    assert keep(z, top_p=0.79) == {1, 3}
    assert keep(z, top_p=0.81) == {1, 2, 3}
    assert keep(z, top_p=1.0) == {0, 1, 2, 3}
    assert keep(z, top_p=1e-9) == {1}  # the most likely token always survives


def test_top_p_applies_to_top_k_renormalised():
    z = torch.log(torch.tensor([0.4, 0.3, 0.2, 0.1])).tolist()
    # top-2 renormalised: 0.571, 0.429 -> mass above token 1 is 0.571
    assert keep(z, top_k=2, top_p=0.6) == {0, 1}
    assert keep(z, top_k=2, top_p=0.55) == {0}


def test_min_p_relative_to_max():
    z = torch.log(torch.tensor([0.5, 0.3, 0.15, 0.05])).tolist()
    assert keep(z, min_p=0.29) == {0, 1, 2}
    assert keep(z, min_p=0.31) == {0, 1}
    assert keep(z, min_p=1.0) == {0}


# ---------------------------------------------------------------------------------------------
# Sampling
# ---------------------------------------------------------------------------------------------
def test_greedy_is_argmax_with_lowest_index_on_ties():
    base = torch.tensor([[0.0, 2.0, 2.0, 1.0], [5.0, 1.0, 0.0, 5.0]])
    tokens, lp = R.merge_sample(base, temperature=0.0, top_k=1, seed=123)
    assert tokens.tolist() == [1, 0]
    torch.testing.assert_close(lp, torch.log_softmax(base, -1)[[0, 1], [1, 0]])


def test_greedy_on_merged_logits():
    base = torch.tensor([[3.0, 0.0, 1.0]])
    value = torch.tensor([[0.0, 4.0, 0.0]])
    assert R.merge_sample(base, value, temperature=0.0)[0].tolist() == [1]
    assert R.merge_sample(base, value, alpha=0.5, temperature=0.0)[0].tolist() == [0]


def test_sample_is_gumbel_argmax_of_the_stream():
    z = torch.randn(4, 37)
    seeds, steps = torch.tensor([7, 8, 9, 10]), torch.tensor([0, 3, 2**33, 1])
    tokens, _ = R.merge_sample(z, temperature=0.8, seed=seeds, step=steps)
    expected = (z / 0.8 + R.gumbel_noise(seeds, steps, 37)).argmax(-1)
    assert torch.equal(tokens, expected)


def test_rows_do_not_depend_on_batch_neighbours():
    z = torch.randn(6, 50)
    kw = dict(
        temperature=torch.tensor([1.0, 0.5, 0.0, 2.0, 1.0, 0.7]),
        top_k=torch.tensor([0, 5, 0, 3, 0, 10]),
        top_p=torch.tensor([1.0, 0.9, 1.0, 0.5, 0.8, 1.0]),
    )
    seeds, steps = torch.arange(6) * 1000, torch.arange(6)
    batch, _ = R.merge_sample(z, seed=seeds, step=steps, **kw)
    for i in range(6):
        one = {k: v[i : i + 1] for k, v in kw.items()}
        alone, _ = R.merge_sample(z[i : i + 1], seed=seeds[i : i + 1], step=steps[i : i + 1], **one)
        assert alone.item() == batch[i].item()


def test_vocab_limit_never_sampled():
    base = torch.zeros(64, 10)
    base[:, 8:] = 100.0  # padded ids with huge garbage logits
    tokens, _ = R.merge_sample(base, vocab_limit=8, seed=torch.arange(64))
    assert (tokens < 8).all() and len(set(tokens.tolist())) > 3


def test_invalid_rows_are_reported_and_isolated():
    base = torch.randn(5, 8)
    base[0, 3] = NAN
    base[1] = -INF
    base[2, 0] = INF
    base[3, 7] = NAN  # in the masked tail: ignored
    tokens, lp = R.merge_sample(base, vocab_limit=7, seed=1)
    assert tokens[:3].tolist() == [R.INVALID_TOKEN] * 3
    assert torch.isnan(lp[:3]).all()
    assert 0 <= tokens[3] < 7 and 0 <= tokens[4] < 7
    assert torch.isfinite(lp[3:]).all()
    alone, _ = R.merge_sample(base[4:], vocab_limit=7, seed=1)
    assert alone.item() == tokens[4].item()


def test_partially_neg_inf_row_samples_only_finite():
    base = torch.full((256, 6), -INF)
    base[:, 2] = 0.0
    base[:, 4] = 0.5
    tokens, lp = R.merge_sample(base, top_k=4, seed=torch.arange(256))
    assert set(tokens.tolist()) == {2, 4}
    assert torch.isfinite(lp).all()


def test_logprob_is_unfiltered_merged_score():
    base, value = torch.randn(8, 20), torch.randn(8, 20)
    tokens, lp = R.merge_sample(base, value, alpha=0.3, temperature=0.5, top_k=3, seed=5)
    ref = torch.log_softmax(base + 0.3 * value, -1).gather(1, tokens[:, None])[:, 0]
    torch.testing.assert_close(lp, ref)


# ---------------------------------------------------------------------------------------------
# Frequencies: many draws from one row against the filtered, renormalised distribution
# ---------------------------------------------------------------------------------------------
FREQ_CASES = [
    dict(temperature=1.0),
    dict(temperature=0.6),
    dict(temperature=1.3, top_k=7),
    dict(temperature=1.0, top_p=0.8),
    dict(temperature=0.9, min_p=0.1),
    dict(temperature=1.1, top_k=12, top_p=0.9, min_p=0.02),
]


def draw_frequencies(z: torch.Tensor, draws: int, chunk: int = 50_000, **kw) -> torch.Tensor:
    counts = torch.zeros(z.shape[1], dtype=torch.float64)
    for start in range(0, draws, chunk):
        n = min(chunk, draws - start)
        steps = torch.arange(start, start + n)
        tokens, _ = R.merge_sample(z.expand(n, -1), seed=2024, step=steps, **kw)
        counts += torch.bincount(tokens, minlength=z.shape[1]).double()
    return counts / draws


def expected_distribution(z: torch.Tensor, temperature=1.0, top_k=0, top_p=1.0, min_p=0.0):
    scaled = z / temperature
    mask = R.keep_mask(scaled, torch.tensor([top_k]), torch.tensor([top_p]), torch.tensor([min_p]))
    return torch.softmax(torch.where(mask, scaled, -INF).double(), -1)[0], mask[0]


@pytest.mark.parametrize(
    "kw", FREQ_CASES, ids=lambda kw: ",".join(f"{k}={v}" for k, v in kw.items())
)
def test_sampling_frequencies_match_distribution(kw):
    torch.manual_seed(0)
    z = torch.randn(1, 40) * 2
    freq = draw_frequencies(z, 200_000, **kw)
    p, mask = expected_distribution(z, **kw)
    assert freq[~mask].sum().item() == 0.0, "a filtered-out token was drawn"
    cos = torch.nn.functional.cosine_similarity(freq, p, dim=0).item()
    assert cos > 0.999
    sd = torch.sqrt(p * (1 - p) / 200_000)
    assert ((freq - p).abs() <= 5 * sd + 1e-9).all()


@pytest.mark.slow
@pytest.mark.parametrize(
    "kw", FREQ_CASES, ids=lambda kw: ",".join(f"{k}={v}" for k, v in kw.items())
)
def test_sampling_frequencies_million_draws(kw):
    torch.manual_seed(1)
    z = torch.randn(1, 100) * 3
    freq = draw_frequencies(z, 1_000_000, **kw)
    p, mask = expected_distribution(z, **kw)
    assert freq[~mask].sum().item() == 0.0
    assert torch.nn.functional.cosine_similarity(freq, p, dim=0).item() > 0.99


# ---------------------------------------------------------------------------------------------
# Bad input
# ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("kwargs", "error", "match"),
    [
        (dict(temperature=-0.5), ValueError, "temperature must be finite and >= 0"),
        (dict(temperature=INF), ValueError, "temperature must be finite"),
        (dict(top_p=0.0), ValueError, r"top_p must be in \(0, 1\]"),
        (dict(top_p=1.5), ValueError, r"top_p must be in \(0, 1\]"),
        (dict(top_k=-1), ValueError, "top_k must be >= 0"),
        (dict(min_p=2.0), ValueError, r"min_p must be in \[0, 1\]"),
        (dict(alpha=NAN), ValueError, "alpha must be finite"),
        (dict(temperature=torch.ones(3)), ValueError, r"scalar or a \[2\] tensor"),
        (dict(top_k=torch.tensor([1.0, 2.0])), TypeError, "top_k must be an integer tensor"),
        (dict(seed=1.5), TypeError, "seed must be an int"),
        (dict(seed=2**64), ValueError, "seed must fit in 64 bits"),
    ],
)
def test_bad_sampling_params(kwargs, error, match):
    with pytest.raises(error, match=match):
        R.merge_sample(torch.randn(2, 5), torch.randn(2, 5), **kwargs)


def test_unsigned_seed_is_same_bit_pattern():
    z = torch.randn(1, 30)
    a, _ = R.merge_sample(z, seed=2**64 - 1)
    b, _ = R.merge_sample(z, seed=-1)
    assert a.item() == b.item()


def test_bad_shapes_and_maps():
    with pytest.raises(ValueError, match=r"shape \[B, V\]"):
        R.merge_logits(torch.randn(5))
    with pytest.raises(ValueError, match=r"ivl vocab build"):
        R.merge_logits(torch.randn(2, 5), torch.randn(2, 6))
    with pytest.raises(ValueError, match="same number of rows"):
        R.merge_logits(torch.randn(2, 5), torch.randn(3, 5))
    with pytest.raises(TypeError, match="float32, bfloat16 or float16"):
        R.merge_logits(torch.ones(2, 5, dtype=torch.int64))
    with pytest.raises(ValueError, match=r"index values must lie in \[-1, 2\]"):
        R.merge_logits(torch.randn(1, 2), torch.randn(1, 3), vocab_map=(torch.tensor([0, 3]), None))
    with pytest.raises(ValueError, match="covers 3 base tokens"):
        R.merge_logits(
            torch.randn(1, 2), torch.randn(1, 3), vocab_map=(torch.tensor([0, 1, 2]), None)
        )
    with pytest.raises(TypeError, match="index must be int64"):
        R.merge_logits(
            torch.randn(1, 2), torch.randn(1, 3), vocab_map=(torch.tensor([0, 1.0]), None)
        )
    with pytest.raises(ValueError, match="vocab_limit"):
        R.merge_logits(torch.randn(1, 2), vocab_limit=3)
