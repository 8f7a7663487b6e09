"""Cascade schemes, built-in recipes and the `ivl train` command on tiny models."""

from __future__ import annotations

import argparse
import json

import pytest
import torch

from ivl.models.tiny import save_tiny, tiny_model
from ivl.train import recipes, schemes
from ivl.train.trainer import TrainConfig, train_value

RECS = [{"prompt": f"Say {i}.", "response": f"{i} {i} {i}"} for i in range(16)]


@pytest.fixture(scope="module")
def pair():
    base, tok = tiny_model("llama", "gpt2", seed=1)
    value, _ = tiny_model("gemma3", "gpt2", seed=2, hidden_size=32, num_hidden_layers=2)
    return base, value, tok


def test_expected_embedding_matches_naive(pair):
    base, value, tok = pair
    ids = torch.randint(0, len(tok), (2, 9), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        hb = schemes.hidden_states(base, ids)
        zb = base(input_ids=ids).logits
    emb = value.get_input_embeddings()
    got = schemes.expected_embedding(hb, base, value, chunk_size=5)
    (g_got,) = torch.autograd.grad(got.square().sum(), emb.weight)
    want = torch.softmax(zb.float(), -1) @ emb.weight * emb.embed_scale  # gemma scales embeddings
    (g_want,) = torch.autograd.grad(want.square().sum(), emb.weight)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(g_got, g_want, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("scheme", ["cascade", "cascade_no_text"])
def test_cascade_is_causal(pair, scheme):
    base, value, tok = pair
    ids = torch.randint(0, len(tok), (1, 8), generator=torch.Generator().manual_seed(1))
    ids2 = ids.clone()
    ids2[0, 5] = (ids[0, 5] + 1) % len(tok)
    outs = []
    with torch.no_grad():
        for x in (ids, ids2):
            hb = schemes.hidden_states(base, x)
            outs.append(schemes.value_hidden_states(value, scheme, x, None, h_base=hb, base=base))
    torch.testing.assert_close(outs[0][:, :5], outs[1][:, :5])
    assert not torch.allclose(outs[0][:, 5:], outs[1][:, 5:])


@pytest.mark.parametrize("scheme", ["cascade", "cascade_no_text"])
def test_cascade_training(tmp_path, scheme):
    base_dir = save_tiny(tmp_path / "b", "qwen2", "gpt2", seed=1)
    cfg = TrainConfig(
        out_dir=str(tmp_path / "o"),
        scheme=scheme,
        max_steps=4,
        batch_size=4,
        grad_accum=1,
        lr=3e-3,
        progress=False,
    )
    out = train_value(str(base_dir), "first-1-layers", RECS, cfg)
    rows = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    assert rows[-1]["loss"] < rows[0]["loss"]
    assert json.loads((out / "ivl.json").read_text())["scheme"] == scheme


def test_gsm_symbolic_split_by_template():
    pytest.importorskip("reasoning_gym")
    train, evals = recipes.load("gsm-symbolic", train_examples=40, eval_examples=10, seed=3)
    assert len(train) == 40 and len(evals) == 10
    assert all(r["response"].rstrip().endswith(f"#### {r['answer']}") for r in train + evals)
    assert not {r["prompt"] for r in train} & {r["prompt"] for r in evals}


def test_truncated_json_array():
    text = '[{"a": 1}, {"b": [2, 3]},\n {"c": "cut'
    assert list(recipes.iter_truncated_json_array(text)) == [{"a": 1}, {"b": [2, 3]}]
    assert list(recipes.iter_truncated_json_array("[1, 2]")) == [1, 2]


def test_sharegpt_recipe_from_file(tmp_path):
    convs = [
        {
            "id": "1",
            "conversations": [{"from": "human", "value": "hi"}, {"from": "gpt", "value": "yo"}],
        },
        {"id": "2", "conversations": [{"from": "human", "value": "only a question"}]},
        {
            "id": "3",
            "conversations": [{"from": "human", "value": "q"}, {"from": "gpt", "value": "a"}],
        },
    ]
    text = json.dumps(convs)[:-30]  # cut inside the last conversation
    (tmp_path / "s.json").write_text(text)
    train, _ = recipes.sharegpt(path=str(tmp_path / "s.json"))
    assert len(train) == 1 and train[0]["conversations"][1]["value"] == "yo"
    with pytest.raises(ValueError, match="unknown recipe"):
        recipes.load("nope")


def _cli(argv):
    from ivl.train.cli import register

    parser = argparse.ArgumentParser(prog="ivl")
    register(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(argv)
    return args.func(args)


def test_cli_train(tmp_path, capsys):
    base_dir = save_tiny(tmp_path / "b", "llama", "gpt2", seed=1)
    data = tmp_path / "d.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in RECS))
    argv = ["train", "--base", str(base_dir), "--value-init", "random", "--data", str(data)]
    argv += ["--out", str(tmp_path / "o"), "--max-steps", "2", "--batch-size", "4", "-q"]
    assert _cli(argv) == 0
    assert capsys.readouterr().out.strip() == str(tmp_path / "o")
    assert (tmp_path / "o" / "ivl.json").is_file()
    data.write_text('{"prompt": "x"}\n')
    with pytest.raises(ValueError, match=r"line 1 .*missing field"):
        _cli([*argv[:7], "--out", str(tmp_path / "o2"), "-q"])
