"""GSM-Symbolic items, JSONL round trips, splits, accuracy with intervals, selection."""

import json

import pytest

from cca_jax.data import gsm_symbolic
from cca_jax.data.gsm_symbolic import Item
from cca_jax.errors import CCAError
from cca_jax.evaluate import gsm


def fake_items(n_templates=5, per=50):
    return [Item(t, k, f"q{t}-{k}", float(k)) for t in range(100, 100 + n_templates) for k in range(per)]


def test_split_sizes_and_determinism():
    items = fake_items()
    s = gsm_symbolic.split(items, seed=3)
    assert [len(s[k]) for k in ("train", "val", "test")] == [5 * 26, 5 * 4, 5 * 20]
    assert s == gsm_symbolic.split(list(reversed(items)), seed=3)  # order-independent
    assert s != gsm_symbolic.split(items, seed=4)
    keys = [{(i.template, i.instance) for i in s[k]} for k in ("train", "val", "test")]
    assert not (keys[0] & keys[1]) and not (keys[0] & keys[2]) and not (keys[1] & keys[2])
    assert sum(len(k) for k in keys) == len(items)


def test_split_fractions_from_the_run_config():
    from cca_jax import runconfig

    items = fake_items(3, 24)
    cfg = runconfig.from_dict({"model": "m", "data": {"split": [0.42, 0.25, 0.33]}})
    s = gsm_symbolic.split(items, 0, cfg.data.split)
    assert [len(s[k]) for k in ("train", "val", "test")] == [3 * 10, 3 * 6, 3 * 8]
    assert gsm_symbolic.split(items, 0) == gsm_symbolic.split(items, 0, (0.52, 0.08, 0.40))
    for bad in ([0.5, 0.5], [0.6, 0.6, -0.2], [0.5, 0.2, 0.2], [0.0, 0.5, 0.5]):
        with pytest.raises(CCAError, match="data.split must be three"):
            runconfig.from_dict({"model": "m", "data": {"split": bad}})


def test_jsonl_round_trip_and_hub_format(tmp_path):
    items = fake_items(2, 3)
    p = gsm_symbolic.write_jsonl(items, tmp_path / "x.jsonl")
    assert gsm_symbolic.read_jsonl(p) == items
    hub = tmp_path / "hub.jsonl"
    hub.write_text(json.dumps({"id": 0, "instance": 7, "question": "Q?", "answer": "a\n#### 1,024",
                               "original_id": 473}) + "\n")
    assert gsm_symbolic.read_jsonl(hub) == [Item(473, 7, "Q?", 1024.0, "a\n#### 1,024")]
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"question": "no answer"}\n')
    with pytest.raises(CCAError, match="bad.jsonl:1: not a GSM-Symbolic record"):
        gsm_symbolic.read_jsonl(bad)


def test_accuracy_is_unweighted_mean_of_templates_with_interval():
    recs = [{"template": 1, "correct": True}] * 10 + [{"template": 2, "correct": False}] * 2 \
        + [{"template": 2, "correct": True}] * 2
    acc = gsm.accuracy(recs)
    assert acc.per_template == {1: 1.0, 2: 0.5}
    assert acc.overall == pytest.approx(0.75)  # not 12/14
    assert acc.low < 0.75 < acc.high and acc.low >= 0.5 and acc.high <= 1.0


def test_select_round_robin():
    items = fake_items(3, 4)
    sel = gsm.select(items, templates=[100, 102], limit=5)
    assert [i.template for i in sel] == [100, 102, 100, 102, 100]
    assert gsm.select(items, templates=[999]) == []


def test_template_ids_instantiate_only_those_templates_and_give_the_same_items(monkeypatch):
    """data.template_ids: only the chosen templates are instantiated (a run of 10 of 100
    templates makes 10 templates' items), and they are the items a full load selects."""
    from cca_jax.data import templates as tlib

    full = gsm_symbolic.load_items("builtin", 3, 0)
    ids = sorted({it.template for it in full})[1:3]
    made = []
    real = tlib.instances
    monkeypatch.setattr(tlib, "instances", lambda t, *a, **k: made.append(t.id) or real(t, *a, **k))
    some = gsm_symbolic.load_items("builtin", 3, 0, template_ids=ids)
    assert made == ids
    assert some == [it for it in full if it.template in ids]
