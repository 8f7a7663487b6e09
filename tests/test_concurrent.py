"""ivl.engine.concurrent.ForwardPool: per-worker intra-op threads, the caller's state untouched."""

from __future__ import annotations

import threading

import pytest
import torch

from ivl.engine.concurrent import ForwardPool


def test_workers_get_their_share_and_the_caller_keeps_its_count():
    before = torch.get_num_threads()
    pool = ForwardPool(2, 1)
    try:
        seen = pool.run([torch.get_num_threads, torch.get_num_threads])
        names = pool.run([lambda: threading.current_thread().name] * 2)
    finally:
        pool.close()
    assert seen == [1, 1]
    assert all(n.startswith("ivl-forward") for n in names)
    assert torch.get_num_threads() == before
    later = []  # a thread the user starts afterwards gets the process's count, not the workers'
    t = threading.Thread(target=lambda: later.append(torch.get_num_threads()))
    t.start()
    t.join()
    assert later == [before]


def test_results_in_order_modes_carried_and_errors_raised():
    pool = ForwardPool(2, 1)
    try:
        assert pool.run([lambda: 1, lambda: 2, lambda: 3]) == [1, 2, 3]
        with torch.inference_mode():
            assert pool.run([torch.is_inference_mode_enabled]) == [True]
        with torch.no_grad():
            assert pool.run([torch.is_grad_enabled]) == [False]
        assert pool.run([torch.is_inference_mode_enabled, torch.is_grad_enabled]) == [False, True]
        ended = threading.Event()

        def slow():
            ended.wait(0.2)
            ended.set()

        def boom():
            raise ValueError("bad forward")

        with pytest.raises(ValueError, match="bad forward"):
            pool.run([boom, slow])
        assert ended.is_set()  # the other call had finished before the error was raised
    finally:
        pool.close()


def test_for_cpu_splits_the_threads():
    before = torch.get_num_threads()
    try:
        torch.set_num_threads(4)
        for n_models, split in ((2, (2, 2)), (3, (3, 1)), (5, (4, 1))):
            pool = ForwardPool.for_cpu(n_models)
            assert (pool.workers, pool.threads) == split
            pool.close()
            assert torch.get_num_threads() == 4
        torch.set_num_threads(1)
        assert ForwardPool.for_cpu(2) is None  # nothing to split
    finally:
        torch.set_num_threads(before)
    with pytest.raises(ValueError, match="2 workers"):
        ForwardPool(1, 4)


def test_narrow_linears_same_product_for_few_rows_only(monkeypatch):
    import torch.nn.functional as F

    from ivl.engine.concurrent import NARROW_ROWS, NarrowLinears

    torch.manual_seed(0)
    w, b = torch.randn(40, 24), torch.randn(40)
    calls = []
    mm = torch.mm
    monkeypatch.setattr(torch, "mm", lambda *a: calls.append(a[0].shape) or mm(*a))
    for shape in ((3, 24), (2, 5, 24), (NARROW_ROWS, 24), (NARROW_ROWS + 1, 24)):
        x = torch.randn(shape)
        want_w, want_wb = F.linear(x, w), F.linear(x, w, b)
        calls.clear()
        with NarrowLinears():
            got_w, got_wb = F.linear(x, w), F.linear(x, w, bias=b)
            half = F.linear(x.half(), w.half())  # fp16: left to torch
        narrow = x.numel() // 24 <= NARROW_ROWS
        assert calls == ([w.shape, w.shape] if narrow else [])  # the weight on the left
        assert got_w.shape == want_w.shape and got_w.is_contiguous()
        torch.testing.assert_close(got_w, want_w)
        torch.testing.assert_close(got_wb, want_wb)
        assert half.dtype == torch.float16
    assert F.linear(torch.randn(2, 24), w).shape == (2, 40)  # outside the mode: untouched
    assert not calls


def test_engine_runs_forwards_side_by_side_only_when_they_cost_alike():
    from ivl.engine import IVLEngine, IVLModel, SamplingParams
    from ivl.models.tiny import tiny_model

    # wide MLPs, so the layers (not the 50k-token head) set a forward's cost: 4 layers vs 1
    kw = dict(initializer_range=0.5, intermediate_size=16384)
    base, tok = tiny_model("llama", "gpt2", seed=0, num_hidden_layers=4, **kw)
    alike, _ = tiny_model("llama", "gpt2", seed=1, num_hidden_layers=4, **kw)
    small, _ = tiny_model("llama", "gpt2", seed=2, num_hidden_layers=1, **kw)
    before = torch.get_num_threads()
    try:
        torch.set_num_threads(2)
        paired = IVLEngine(IVLModel.from_pretrained((base, tok), (alike, tok)), max_batch=2)
        unequal = IVLModel.from_pretrained((base, tok), (small, tok))
        one_by_one = IVLEngine(unequal, max_batch=2)
        forced = IVLEngine(unequal, max_batch=2, parallel_forwards=True)
    finally:
        torch.set_num_threads(before)
    assert paired._pool is not None and forced._pool is not None
    assert one_by_one._pool is None
    assert paired.cache.narrow_linears and one_by_one.cache.narrow_linears  # on the CPU
    # the narrow products give the tokens of the plain ones
    params = SamplingParams(temperature=0, max_new_tokens=8, ignore_eos=True)
    prompts = ["Hello there", "The quick brown fox jumps over the lazy dog"]
    narrow = [r.token_ids for r in one_by_one.generate_many(prompts, params)]
    one_by_one.cache.narrow_linears = False
    assert [r.token_ids for r in one_by_one.generate_many(prompts, params)] == narrow
    for engine in (paired, forced):
        engine._pool.close()
