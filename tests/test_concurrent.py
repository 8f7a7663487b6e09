"""ivl.engine.concurrent: ForwardPool (per-worker intra-op threads, the caller's state untouched)
and the routing of decode-step linears to the narrow kernel."""

from __future__ import annotations

import copy as copy_module
import pickle
import threading
import types

import pytest
import torch
import torch.nn.functional as F

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


def test_routed_linears_go_narrow_for_few_rows_only_when_switched_on(monkeypatch):
    from ivl.engine import concurrent
    from ivl.engine.concurrent import NARROW_ROWS, narrow_linears, route_linears

    torch.manual_seed(0)
    plain = torch.nn.Linear(24, 40)
    custom = torch.nn.Linear(24, 40)
    custom.forward = lambda x: torch.zeros(())  # an instance forward of the user's: kept
    model = torch.nn.Sequential(plain, torch.nn.Sequential(custom))
    route_linears(model)
    route_linears(model)  # idempotent
    assert custom(torch.randn(2, 24)).shape == ()
    calls = []
    narrow_linear = concurrent._narrow_linear
    monkeypatch.setattr(
        concurrent, "_narrow_linear", lambda x, *a: calls.append(x.shape) or narrow_linear(x, *a)
    )
    limit = NARROW_ROWS[torch.float32]
    for shape in ((1, 24), (2, 3, 24), (limit, 24), (limit + 1, 24)):
        x = torch.randn(shape)
        want = F.linear(x, plain.weight, plain.bias)
        with torch.no_grad():
            off = plain(x)  # routed but not switched on: F.linear exactly
            calls.clear()
            with narrow_linears():
                got = plain(x)
                half = plain.half()(x.half())  # 16-bit models too (with the native kernel)
                double = plain.double()(x.double())  # other dtypes: left to torch
                plain.float()
        rows = x.numel() // 24
        want_calls = [(rows, 24)] if rows <= limit else []
        if rows <= NARROW_ROWS.get(torch.float16, 0):
            want_calls.append((rows, 24))
        assert calls == want_calls
        assert torch.equal(off, want)
        assert got.shape == want.shape and got.is_contiguous()
        torch.testing.assert_close(got, want)
        assert half.dtype == torch.float16 and double.dtype == torch.float64
        torch.testing.assert_close(half.float(), want, rtol=1e-2, atol=2e-2)
    with narrow_linears():
        with narrow_linears():
            pass
        assert concurrent._switch.on  # nested exits restore the outer state
        calls.clear()
        y = plain(torch.randn(2, 24))  # grad enabled and the weight requires it: left to torch
        assert not calls and y.requires_grad
    assert not concurrent._switch.on
    for copy in (copy_module.deepcopy(plain), pickle.loads(pickle.dumps(plain))):
        assert copy.forward.args[0] is copy  # still routed, to the copy's own layer
        torch.testing.assert_close(copy(x), plain(x))
    seen = []  # the switch is per thread: a thread that did not switch it on stays plain
    with narrow_linears():
        t = threading.Thread(target=lambda: seen.append(concurrent._switch.__dict__.get("on")))
        t.start()
        t.join()
    assert seen == [None]
    # a strided input (HF's logits_to_keep=1 slice of a prefill) reaches torch contiguous: its
    # CPU bf16 GEMM was measured ~450x slower on the strided view
    seen.clear()
    spy = lambda x, w, b: seen.append(x.is_contiguous()) or F.linear(x, w, b)  # noqa: E731
    monkeypatch.setattr(concurrent, "F", types.SimpleNamespace(linear=spy))
    last = torch.randn(3, 5, 24)[:, -1:, :]
    assert not last.is_contiguous()
    with torch.no_grad():
        out = plain(last)
    assert seen == [True] and torch.equal(out, F.linear(last, plain.weight, plain.bias))


def test_narrow_linear_uses_the_native_kernel_else_blas(monkeypatch):
    from ivl.engine.concurrent import _narrow_linear
    from ivl.ops import _native

    x, w, b = torch.randn(5, 24), torch.randn(40, 24), torch.randn(40)
    if _native.AVAILABLE:
        assert torch.equal(_narrow_linear(x, w, b), torch.ops.ivl.narrow_linear(x, w, b))
    monkeypatch.setattr(_native, "AVAILABLE", False)
    assert torch.equal(_narrow_linear(x, w, b), torch.mm(w, x.T).T + b)  # weight on the left
    assert _narrow_linear(x, w, None).is_contiguous()


def test_engine_runs_forwards_side_by_side_only_when_they_cost_alike(monkeypatch):
    from ivl.engine import IVLEngine, IVLModel, SamplingParams, concurrent
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
    # both ways the decode linears run the narrow kernel, and give the tokens of plain ones
    rows = []
    narrow_linear = concurrent._narrow_linear
    monkeypatch.setattr(
        concurrent, "_narrow_linear", lambda x, *a: rows.append(len(x)) or narrow_linear(x, *a)
    )
    params = SamplingParams(temperature=0, max_new_tokens=8, ignore_eos=True)
    prompts = ["Hello there", "The quick brown fox jumps over the lazy dog"]
    narrow = [r.token_ids for r in one_by_one.generate_many(prompts, params)]
    assert rows.count(2) >= 7 * (4 + 1) * 7  # 7 decode steps x 5 layers x 7 linears, 2 rows
    rows.clear()
    assert [r.token_ids for r in forced.generate_many(prompts, params)] == narrow
    assert rows.count(2) >= 7 * (4 + 1) * 7
    for engine in (one_by_one, forced):
        engine.cache.narrow_linears = False
    rows.clear()
    assert [r.token_ids for r in one_by_one.generate_many(prompts, params)] == narrow
    assert [r.token_ids for r in forced.generate_many(prompts, params)] == narrow
    assert not rows
    for engine in (paired, forced):
        engine._pool.close()


def test_narrow_row_limits_follow_the_cpu(monkeypatch):
    """The narrow path takes as many rows as it was measured to win on this kind of CPU."""
    from ivl.engine import concurrent

    f32, bf16, f16 = torch.float32, torch.bfloat16, torch.float16
    for kernel, capability, want in (
        (False, "AVX2", {f32: 64}),  # no kernel: fp32 only, through BLAS's weight-left form
        (True, "AVX2", {f32: 64, bf16: 64, f16: 64}),
        (True, "AVX512", {f32: 8, f16: 4, bf16: 1}),
    ):
        monkeypatch.setattr(concurrent, "_NARROW_KERNEL", kernel)
        monkeypatch.setattr(torch.backends.cpu, "get_cpu_capability", lambda c=capability: c)
        assert concurrent._row_limits() == want
