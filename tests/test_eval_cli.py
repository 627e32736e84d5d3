"""`cca-jax data gsm-symbolic` and `cca-jax eval` end to end (tiny model, real files)."""

import json

import pytest

from cca_jax import cli
from cca_jax.char_tokenizer import char_tokenizer
from cca_jax.data import gsm_symbolic

import tiny


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory):
    d = tmp_path_factory.mktemp("tiny_char")
    m = tiny.hf_model("llama", vocab_size=128)
    m.save_pretrained(d)
    char_tokenizer(128).save_pretrained(d)
    return d


def test_data_command_writes_instances(tmp_path, capsys):
    out = tmp_path / "builtin.jsonl"
    assert cli.main(["data", "gsm-symbolic", "--per-template", "5", "--seed", "3", "--out", str(out)]) == 0
    items = gsm_symbolic.read_jsonl(out)
    assert len(items) == 24 * 5 and len({i.template for i in items}) == 24
    assert "wrote 120 instances of 24 templates" in capsys.readouterr().out
    again = tmp_path / "again.jsonl"
    cli.main(["data", "gsm-symbolic", "--per-template", "5", "--seed", "3", "--out", str(again)])
    assert again.read_text() == out.read_text()  # deterministic for the seed


def test_eval_command(tmp_path, tiny_dir, capsys):
    out = tmp_path / "ev"
    code = cli.main(["eval", "--model", str(tiny_dir), "--data", "toy:digits", "--limit", "7", "--shots", "0",
                     "--max-new-tokens", "8", "--templates", "1,3", "--out", str(out)])
    assert code == 0
    printed = capsys.readouterr().out
    assert "accuracy" in printed and "95% CI" in printed
    res = json.loads((out / "results.json").read_text())
    assert res["accuracy"]["n_items"] == 7 and set(res["accuracy"]["per_template"]) == {"1", "3"}
    recs = [json.loads(l) for l in (out / "items.jsonl").read_text().splitlines()]
    assert len(recs) == 7
    for r in recs:
        assert {"template", "instance", "prompt_tokens", "generated_tokens", "generated_text", "extracted", "gold",
                "correct"} <= set(r)
        assert len(r["generated_tokens"]) <= 8


def test_eval_errors(tiny_dir, capsys):
    assert cli.main(["eval", "--model", str(tiny_dir), "--data", "/no/such.jsonl"]) == 2
    assert "no such file or directory: /no/such.jsonl" in capsys.readouterr().err
    assert cli.main(["eval", "--model", str(tiny_dir), "--data", "toy:digits", "--templates", "77"]) == 2
    assert "no items left" in capsys.readouterr().err
    assert cli.main(["eval", "--model", str(tiny_dir), "--data", "toy:digits", "--templates", "x"]) == 2


def test_hub_data_offline_is_one_line(monkeypatch, capsys):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    assert cli.main(["eval", "--model", "x", "--data", "hub:main"]) == 2
    assert "cannot download apple/GSM-Symbolic (main)" in capsys.readouterr().err
