"""The engine on a real model (SmolLM2-135M-Instruct from the offline zoo, fp32, CPU), where its
decode-step linears run ivl's narrow kernel while the references run ``nn.Linear`` (BLAS):

- alpha = 0, greedy: the tokens of HF ``generate`` of the base alone;
- alpha = 1, greedy: the tokens of the no-cache loop (``naive_generate``, the authors' approach);
- ``IVLForCausalLM.generate``: the engine's tokens.

The value network is the base's first 4 layers (with its embeddings and head): a real model of
the same tokenizer whose logits differ from the base's.
"""

from __future__ import annotations

import pytest
import torch

pytestmark = pytest.mark.zoo

NAME = "smollm2-135m-instruct"
PROMPTS = [
    "The three primary colors are",
    "def fibonacci(n):\n    ",
    "Question: Tom has 3 apples and buys 5 more. How many apples does he have?\nAnswer:",
    "Once upon a time, in a small village by the sea,",
]
NEW = 24


@pytest.fixture(scope="module")
def model():
    from ivl.engine import IVLModel
    from ivl.models.loading import load_model, load_tokenizer
    from ivl.train.trainer import truncate_layers

    base, tok = load_model(NAME, dtype=torch.float32), load_tokenizer(NAME)
    return IVLModel.from_pretrained((base, tok), (truncate_layers(base, 4), tok))


def _engine(model, alpha: float) -> list[list[int]]:
    from ivl.engine import IVLEngine, SamplingParams

    engine = IVLEngine(model, max_batch=len(PROMPTS), max_len=128)
    params = SamplingParams(temperature=0, max_new_tokens=NEW, alpha=alpha)
    assert engine.cache.narrow_linears  # the CPU engine's forwards take the narrow kernel
    return [r.token_ids for r in engine.generate_many(PROMPTS, params)]


def test_alpha_zero_gives_hf_generate_of_the_base(model):
    tok, eos = model.tokenizer, model.eos_ids()
    got = _engine(model, 0.0)
    for prompt, tokens in zip(PROMPTS, got, strict=True):
        enc = tok(prompt, return_tensors="pt")
        with torch.no_grad():
            out = model.base.generate(
                **enc, max_new_tokens=NEW, do_sample=False, pad_token_id=tok.eos_token_id
            )
        want = out[0, enc.input_ids.shape[1] :].tolist()
        cut = next((i for i, t in enumerate(want) if t in eos), len(want))
        assert tokens == want[:cut], prompt


def test_alpha_one_gives_the_no_cache_loop_and_ivl_for_causal_lm(model):
    from ivl.engine import IVLForCausalLM, SamplingParams
    from ivl.engine.naive import naive_generate

    got = _engine(model, 1.0)
    params = SamplingParams(temperature=0, max_new_tokens=NEW, seed=0)
    tok = model.tokenizer
    lm = IVLForCausalLM(model, alpha=1.0)
    differs = 0
    for prompt, tokens in zip(PROMPTS, got, strict=True):
        ids = tok(prompt).input_ids
        assert tokens == naive_generate(model, ids, params), prompt
        out = lm.generate(
            input_ids=torch.tensor([ids]),
            max_new_tokens=NEW,
            do_sample=False,
            pad_token_id=tok.eos_token_id,
        )
        want = out[0, len(ids) :].tolist()
        cut = next((i for i, t in enumerate(want) if t in model.eos_ids()), len(want))
        assert tokens == want[:cut], prompt
        differs += tokens != _engine_alone(model, prompt)
    assert differs  # the value changes the base's tokens on at least one prompt


def _engine_alone(model, prompt: str) -> list[int]:
    from ivl.engine import IVLEngine, SamplingParams

    params = SamplingParams(temperature=0, max_new_tokens=NEW, alpha=0.0)
    return IVLEngine(model, max_batch=1, max_len=128).generate(prompt, params).token_ids
