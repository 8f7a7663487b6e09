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
