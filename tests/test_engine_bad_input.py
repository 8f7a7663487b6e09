"""Bad input to the engine (issue "Bad input" list) beyond tests/test_engine.py.

Already covered there: a prompt longer than the cache, an empty prompt and out-of-range ids in a
batch (test_bad_requests_fail_alone), NaN logits (test_nan_value_fails_only_its_request), a
different tokenizer with no map (test_vocab_checks), a value trained with another scheme
(test_scheme_read_from_ivl_json) and invalid SamplingParams values (test_sampling_params_*).
"""

from __future__ import annotations

import json

import pytest

from ivl.engine import IVLEngine, IVLModel, SamplingParams

GREEDY = SamplingParams(temperature=0, max_new_tokens=4, ignore_eos=True)


@pytest.fixture(scope="module")
def nets():
    from ivl.models.tiny import tiny_model

    base, tok = tiny_model("llama", "gpt2", seed=0, initializer_range=0.5)
    value, _ = tiny_model("llama", "gpt2", seed=1, initializer_range=0.5)
    return base, value, tok


@pytest.fixture(scope="module")
def model(nets):
    base, value, tok = nets
    return IVLModel.from_pretrained((base, tok), (value, tok))


def _alone(model, prompt, params=GREEDY):
    return IVLEngine(model, max_batch=1, max_len=32).generate(prompt, params)


def test_bad_prompt_types_and_chat_fail_alone(model):
    # gpt2's tokenizer has no chat template: chat messages fail, plain prompts go on
    assert getattr(model.tokenizer, "chat_template", None) is None
    prompts = ["Hi", None, [{"role": "user", "content": "Hi"}], 3.5, "Once upon a time"]
    results = IVLEngine(model, max_batch=2, max_len=32).generate_many(prompts, GREEDY)
    assert [r.finish_reason for r in results] == ["length", "error", "error", "error", "length"]
    assert "prompt must be" in results[1].error and "prompt must be" in results[3].error
    assert "chat template" in results[2].error
    for i in (0, 4):
        assert results[i].token_ids == _alone(model, prompts[i]).token_ids


def test_prompt_length_boundary(model):
    engine = IVLEngine(model, max_batch=2, max_len=8)
    fits = list(range(100, 108))  # exactly max_len tokens: one token can still be sampled
    over = list(range(100, 109))
    res = engine.generate_many([fits, over, [5, 6]], GREEDY)
    assert res[0].ok and len(res[0].token_ids) == 1 and res[0].finish_reason == "length"
    assert not res[1].ok and "9 tokens" in res[1].error and "max_len" in res[1].error
    assert res[2].ok and len(res[2].token_ids) == 4


def test_errors_are_streamed_and_others_continue(model):
    engine = IVLEngine(model, max_batch=2, max_len=16)
    prompts = ["Hi", "", "Once upon a time", " ".join(["word"] * 30)]
    ends = {}
    tokens = {i: 0 for i in range(len(prompts))}
    for event in engine.stream(prompts, GREEDY):
        if event.result is not None:
            assert event.request_id not in ends  # every request ends exactly once
            ends[event.request_id] = event.result
        else:
            tokens[event.request_id] += 1
    assert sorted(ends) == [0, 1, 2, 3]
    assert [ends[i].ok for i in range(4)] == [True, False, True, False]
    assert tokens == {0: 4, 1: 0, 2: 4, 3: 0}


def test_per_request_params_errors(model):
    engine = IVLEngine(model, max_batch=2, max_len=16)
    with pytest.raises(ValueError, match="2 SamplingParams for 3 prompts"):
        engine.generate_many(["a", "b", "c"], [GREEDY, GREEDY])
    with pytest.raises(TypeError, match=r"params\[1\] must be a SamplingParams"):
        engine.generate_many(["a", "b"], [GREEDY, {"temperature": 0}])
    with pytest.raises(TypeError, match="prompts must be a list"):
        engine.generate_many("a single string", GREEDY)
    with pytest.raises(ValueError, match="max_batch and max_len"):
        IVLEngine(model, max_batch=0)


@pytest.mark.parametrize(
    "kwargs, exc, msg",
    [
        (dict(stop_token_ids=["7"]), ValueError, "stop_token_ids"),
        (dict(stop=[3]), ValueError, "stop"),
        (dict(top_k=True), TypeError, "top_k"),
        (dict(temperature="0.5"), TypeError, "temperature"),
        (dict(max_new_tokens=2.0), TypeError, "max_new_tokens"),
        (dict(min_p=-0.1), ValueError, "min_p"),
        (dict(alpha=float("nan")), ValueError, "alpha"),
    ],
)
def test_sampling_params_more(kwargs, exc, msg):
    with pytest.raises(exc, match=msg):
        SamplingParams(**kwargs)


def test_model_construction_errors(nets, tmp_path):
    base, value, tok = nets
    with pytest.raises(ValueError, match="anti_expert"):
        IVLModel.from_pretrained((base, tok), (value, tok), scheme="proxy")
    with pytest.raises(ValueError, match="only used with scheme='proxy'"):
        IVLModel.from_pretrained((base, tok), (value, tok), anti_expert=(value, tok))
    with pytest.raises(ValueError, match="proxy-tuning needs value="):
        IVLModel.from_pretrained((base, tok), scheme="proxy")
    with pytest.raises(TypeError, match="zoo name, a folder"):
        IVLModel.from_pretrained((base, tok), 42)


def test_ivl_json_errors_and_proxy(tmp_path, nets):
    from ivl.models.tiny import save_tiny

    base_dir = save_tiny(tmp_path / "base", "llama", "gpt2", seed=0)
    value_dir = save_tiny(tmp_path / "value", "llama", "gpt2", seed=1)
    (value_dir / "ivl.json").write_text("{not json")
    with pytest.raises(ValueError, match=r"ivl\.json is not valid JSON"):
        IVLModel.from_pretrained(str(base_dir), str(value_dir))
    (value_dir / "ivl.json").write_text(json.dumps({"scheme": "cascade_no_text"}))
    with pytest.raises(ValueError, match="pass scheme='cascade_no_text'"):
        IVLModel.from_pretrained(str(base_dir), str(value_dir), scheme="residual")
    # proxy-tuning uses the folder as a plain expert: its training scheme does not apply
    anti = save_tiny(tmp_path / "anti", "llama", "gpt2", seed=2)
    m = IVLModel.from_pretrained(
        str(base_dir), str(value_dir), scheme="proxy", anti_expert=str(anti)
    )
    assert m.expert is m.value and m.anti_expert is not None
