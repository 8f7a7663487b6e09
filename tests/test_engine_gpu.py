"""The engine on a CUDA device (``gpu`` suite): tiny random models with a real tokenizer.

The same references as tests/test_engine.py, with every model, cache and fused op on the GPU:
HF ``generate`` of the base alone (alpha = 0), and the no-cache recompute loop (alpha != 0,
sampled rows too: it shares the RNG contract). On a lent machine without the project's
transformers or the zoo cache, benchmarks/gpu_prepare.sh packs both for benchmarks/gpu_check.sh.
"""

from __future__ import annotations

import pytest
import torch
from test_engine import PROMPTS, tiny_pairs

from ivl.engine import IVLEngine, IVLModel, SamplingParams
from ivl.engine.naive import naive_generate


def _old_transformers() -> bool:
    from importlib.metadata import version

    from packaging.version import Version

    return Version(version("transformers")) < Version("5.24")


pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device"),
    pytest.mark.skipif(
        _old_transformers(),
        reason="the engine needs transformers >= 5.24 (benchmarks/gpu_prepare.sh packs it)",
    ),
]
DEVICE = "cuda"


@pytest.fixture(scope="module")
def pairs():
    return tiny_pairs(DEVICE)


@pytest.mark.parametrize("arch", ["llama", "qwen2", "gemma3"])
def test_alpha0_greedy_matches_hf_generate_on_gpu(pairs, arch):
    base, value, tok = pairs(arch)
    model = IVLModel.from_pretrained((base, tok), (value, tok))
    assert model.device.type == DEVICE
    engine = IVLEngine(model, max_batch=2, max_len=96)
    params = SamplingParams(temperature=0, alpha=0, max_new_tokens=24, ignore_eos=True)
    for prompt, res in zip(PROMPTS[:3], engine.generate_many(PROMPTS[:3], params), strict=True):
        enc = tok(prompt, return_tensors="pt").to(DEVICE)
        hf = base.generate(**enc, max_new_tokens=24, do_sample=False, min_new_tokens=24)
        assert res.token_ids == hf[0, enc.input_ids.shape[1] :].tolist(), prompt


@pytest.mark.parametrize("arch", ["llama", "gemma3"])
def test_greedy_and_sampled_match_naive_recompute_on_gpu(pairs, arch):
    base, value, tok = pairs(arch)
    model = IVLModel.from_pretrained((base, tok), (value, tok))
    params = [
        SamplingParams(temperature=0, max_new_tokens=12, seed=3),
        SamplingParams(temperature=1.0, max_new_tokens=10, seed=11),
        SamplingParams(temperature=0.7, top_k=50, max_new_tokens=9, seed=12, alpha=0.5),
        SamplingParams(temperature=1.3, top_p=0.9, max_new_tokens=10, seed=13, logprobs=True),
        SamplingParams(temperature=0.9, min_p=0.05, max_new_tokens=5, seed=14, alpha=2.0),
    ]
    want = [
        naive_generate(model, model.encode(pr), p) for pr, p in zip(PROMPTS, params, strict=True)
    ]
    # 5 requests through 2 slots, in another order: continuous batching on the GPU
    order = [3, 1, 4, 0, 2]
    engine = IVLEngine(model, max_batch=2, max_len=96)
    got = engine.generate_many([PROMPTS[i] for i in order], [params[i] for i in order])
    for j, i in enumerate(order):
        assert got[j].token_ids == want[i], (arch, i)
    lp = got[order.index(3)].logprobs
    assert lp is not None and len(lp) == len(want[3]) and all(x <= 0 for x in lp)
