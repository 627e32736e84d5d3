"""`cca-jax data gsm-symbolic` and `cca-jax eval` end to end (tiny model, real files)."""

import json

import numpy as np
import pytest

from cca_jax import cli
from cca_jax.char_tokenizer import char_tokenizer
from cca_jax.data import gsm_symbolic
from cca_jax.evaluate import gsm

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


def _stratified_interval(records, n_boot=2000, seed=0):
    """The interval as computed before templates could be resampled: items resampled
    within each template, the mean of the template means."""
    groups = {}
    for r in records:
        groups.setdefault(r["template"], []).append(float(r["correct"]))
    rng = np.random.default_rng(seed)
    boots = sum(rng.choice(np.asarray(v), size=(n_boot, len(v))).mean(axis=1) for v in groups.values()) / len(groups)
    return tuple(np.percentile(boots, [2.5, 97.5]))


def test_interval_with_one_item_per_template_resamples_templates():
    recs = [{"template": t, "correct": t % 3 == 0} for t in range(20)]  # 7 right, 13 wrong
    acc = gsm.accuracy(recs)
    assert acc.overall == pytest.approx(0.35) and acc.interval == "templates"
    assert acc.low < 0.35 < acc.high and acc.high - acc.low > 0.2  # was 0.350-0.350
    assert _stratified_interval(recs) == (0.35, 0.35)  # what resampling within templates gives
    same = gsm.accuracy([{"template": t, "correct": True} for t in range(5)])
    assert (same.low, same.high) == (1.0, 1.0)  # no variation anywhere: nothing to show


def test_interval_with_several_items_per_template_is_unchanged():
    rng = np.random.default_rng(3)
    recs = [{"template": t, "correct": bool(rng.random() < 0.2 + 0.1 * t)} for t in range(6) for _ in range(4)]
    acc = gsm.accuracy(recs)
    assert acc.interval == "items" and (acc.low, acc.high) == _stratified_interval(recs)
    assert acc.high > acc.low
