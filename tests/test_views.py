"""Circuit views: named axes and shapes (penzai), treescope HTML, report PNGs."""

import json
import sys

import numpy as np
import pytest

from cca_jax import report, views
from cca_jax.cca import components
from cca_jax.errors import CCAError

L, H, KV, F = 3, 4, 2, 40


def _mask(seed=0):
    rng = np.random.default_rng(seed)
    m = {"q": rng.random((L, H)) < 0.5, "k": rng.random((L, KV)) < 0.5, "v": rng.random((L, KV)) < 0.5,
         "mlp": rng.random((L, F)) < 0.1}
    m["mlp"][1, :] = False  # a layer without neurons
    m["mlp"][2, :10] = True
    return m


def test_named_axes_and_shapes():
    pytest.importorskip("penzai")
    m = _mask()
    nm = views.named(m)
    assert set(nm) == {"q", "k", "v", "mlp"}
    assert dict(nm["q"].named_shape) == {"layer": L, "head": H}
    assert dict(nm["k"].named_shape) == {"layer": L, "kv_head": KV}
    assert dict(nm["v"].named_shape) == {"layer": L, "kv_head": KV}
    assert dict(nm["mlp"].named_shape) == {"layer": L, "neuron": F}
    assert nm["q"].positional_shape == ()
    # values survive: unwrap in the named order gives the original array
    np.testing.assert_array_equal(np.asarray(nm["mlp"].unwrap("layer", "neuron")), m["mlp"])
    np.testing.assert_array_equal(np.asarray(nm["k"].unwrap("kv_head", "layer")), m["k"].T)


def test_treescope_html_names_the_axes():
    pytest.importorskip("treescope")
    pytest.importorskip("penzai")
    html = views.to_html(_mask(), compressed=False)
    for axis in ("layer", "head", "kv_head", "neuron"):
        assert axis in html
    figs = views.figures(_mask())
    assert set(figs) == {"q", "k", "v", "mlp"}


def test_counts_head_matrix_and_density():
    m = _mask()
    c = views.counts(m)
    assert c["per_layer"] == components.per_layer(m)
    assert c["selected_total"] == components.count(m)
    assert c["components_total"] == L * (H + 2 * KV + F)
    assert c["neuron_fraction_per_layer"][1] == 0.0
    grid, labels = views.head_matrix(m)
    assert grid.shape == (L, H + 2 * KV)
    assert labels[:H] == [f"q{i}" for i in range(H)] and labels[H] == "k0" and labels[-1] == f"v{KV - 1}"
    np.testing.assert_array_equal(grid[:, H:H + KV], m["k"])
    d = views.neuron_density(m, bins=4)
    assert d.shape == (L, 4)
    assert d[2, 0] == 1.0  # neurons 0..9 of layer 2
    np.testing.assert_allclose(d.mean(axis=1), m["mlp"].mean(axis=1))


def test_bad_circuits_are_errors(tmp_path):
    with pytest.raises(CCAError, match="keys"):
        views.load({"q": np.zeros((2, 2))})
    bad = _mask()
    bad["v"] = np.zeros((L + 1, KV), bool)
    with pytest.raises(CCAError, match="disagree"):
        views.load(bad)
    with pytest.raises(CCAError, match="no circuit"):
        views.load(tmp_path / "nothing")


def test_pngs_for_masks_and_effects(tmp_path):
    pytest.importorskip("matplotlib")
    files = views.write_pngs(_mask(), tmp_path)
    assert [f.name for f in files] == ["circuit_layer_counts.png", "circuit_heads.png",
                                      "circuit_neuron_density.png"]
    for f in files:
        assert f.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and f.stat().st_size > 2000
    eff = {k: np.random.default_rng(1).normal(size=np.shape(v)) for k, v in _mask().items()}
    (f,) = views.write_pngs(eff, tmp_path, prefix="effects")
    assert f.name == "effects_heads.png" and f.stat().st_size > 2000
    assert not list(tmp_path.glob("*.tmp.png"))


def test_run_report_writes_circuit_pngs_and_markdown(tmp_path):
    pytest.importorskip("matplotlib")
    m = _mask()
    components.save(m, tmp_path / "stages" / "circuit" / "mask.npz")
    acc = {"overall": 0.25, "low": 0.1, "high": 0.4, "per_template": {"1": 0.25}, "n_items": 8}
    summary = {"model": "x", "components_total": L * (H + 2 * KV + F), "components_selected": components.count(m),
               "fraction_components": 0.1, "components_per_layer": components.per_layer(m),
               "fraction_parameters_changed": 0.05, "selected_templates": [1],
               "localization": {"items": 4, "examples": 3}, "val_accuracy_by_step": {"0": 0.5, "2": 0.75},
               "best_step": 2, "test_accuracy_before": acc,
               "test_accuracy_after": {**acc, "overall": 0.5, "per_template": {"1": 0.5}},
               "test_accuracy_selected_templates": {"before": 0.25, "after": 0.5}, "timings_seconds": {"load": 1}}
    files = report.plots(json.loads(json.dumps(summary)), tmp_path)
    names = {f.name for f in files}
    assert {"val_accuracy.png", "circuit_heads.png", "circuit_layer_counts.png",
            "circuit_neuron_density.png"} <= names
    md = (tmp_path / "report.md").read_text()
    assert "0.250 [0.100, 0.400]" in md and "0.500 [0.100, 0.400]" in md and "+0.250" in md
    assert "(plots/circuit_heads.png)" in md


def test_missing_penzai_says_how_to_install(monkeypatch):
    monkeypatch.setitem(sys.modules, "penzai", None)  # import penzai -> ImportError
    monkeypatch.setitem(sys.modules, "penzai.pz", None)
    with pytest.raises(ImportError, match=r"pip install 'cca-jax\[viz\]'"):
        views.named(_mask())
