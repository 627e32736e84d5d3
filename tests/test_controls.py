"""Is the gain real? Random-circuit controls, paired statistics (checked against scipy),
and the sweep over seeds and variants on the tiny config."""

import json
import shutil

import numpy as np
import pytest
from scipy import stats

from cca_jax import cli, pipeline, runconfig
from cca_jax.cca import components
from cca_jax.errors import CCAError
from cca_jax.evaluate import paired
from tiny import CONFIG

FAST = ["amplify.steps=2", "amplify.eval_steps=[2]", "dcm.epochs=2"]


def test_mcnemar_exact_equals_scipy_binomial_test():
    rng = np.random.default_rng(0)
    for _ in range(20):
        n = int(rng.integers(5, 80))
        a, b = rng.random(n) < rng.random(), rng.random(n) < rng.random()
        got = paired.mcnemar_exact(a, b)
        k, m = int(np.sum(a & ~b)), int(np.sum(~a & b))
        assert (got["a_only"], got["b_only"]) == (k, m)
        want = 1.0 if k + m == 0 else stats.binomtest(k, k + m, 0.5).pvalue
        assert got["p_value"] == pytest.approx(want, rel=1e-9, abs=1e-12)


def test_paired_bootstrap_matches_scipy_on_one_template():
    """With one template the stratified paired bootstrap is the plain paired bootstrap of
    the mean difference: its interval equals scipy's percentile bootstrap."""
    rng = np.random.default_rng(1)
    n = 200
    a = rng.random(n) < 0.4
    b = np.where(rng.random(n) < 0.3, ~a, a) | (rng.random(n) < 0.1)
    t = np.zeros(n, int)
    got = paired.paired_bootstrap(t, a, b, n_boot=20000, seed=3)
    diff = b.astype(float) - a.astype(float)
    want = stats.bootstrap((diff,), np.mean, n_resamples=20000, method="percentile", random_state=5)
    assert got["delta"] == pytest.approx(diff.mean())
    assert got["ci"][0] == pytest.approx(want.confidence_interval.low, abs=0.01)
    assert got["ci"][1] == pytest.approx(want.confidence_interval.high, abs=0.01)
    # the bootstrap p-value: twice the share of resamples at or beyond 0, in line with a
    # normal approximation from scipy's bootstrap standard error
    z = diff.mean() / want.standard_error
    assert got["p_value"] == pytest.approx(2 * stats.norm.sf(abs(z)), abs=0.02)


def test_template_mean_and_template_resampling_for_single_items():
    recs_a = [{"template": t, "instance": 0, "correct": t % 2 == 0} for t in range(10)]
    recs_b = [{"template": t, "instance": 0, "correct": t % 3 != 1} for t in range(10)]
    res = paired.compare(recs_a, recs_b)
    assert res["accuracy_a"] == 0.5 and res["accuracy_b"] == pytest.approx(0.7)
    assert res["ci"][0] < res["delta"] < res["ci"][1]  # templates resampled: a real interval
    with pytest.raises(Exception, match="share no test items"):
        paired.compare(recs_a, [{"template": 99, "instance": 0, "correct": True}])


@pytest.fixture(scope="module")
def dcm_run(tmp_path_factory):
    d = tmp_path_factory.mktemp("dcm_run")
    cfg = runconfig.load(CONFIG, FAST)
    return cfg, d, pipeline.run(cfg, d, progress=False, log=lambda s: None)


def test_random_circuit_has_the_reference_circuits_per_layer_sizes(dcm_run, tmp_path):
    cfg, d, s = dcm_run
    ref = components.load(d / "stages" / "circuit" / "mask.npz")
    shutil.copytree(d / "stages" / "base_eval", tmp_path / "r" / "stages" / "base_eval")
    shutil.copytree(d / "stages" / "localize", tmp_path / "r" / "stages" / "localize")
    got = pipeline.run(runconfig.load(CONFIG, FAST + ["localize=random", f"random.like={d}", "random.seed=3"]),
                       tmp_path / "r", progress=False, log=lambda m: None)
    rnd = components.load(tmp_path / "r" / "stages" / "circuit" / "mask.npz")
    assert components.per_layer(rnd) == components.per_layer(ref)
    assert got["components_selected"] == s["components_selected"]
    frac = components.random_fraction(_model_cfg(), 0.25, 0)
    assert all(np.asarray(v).sum(axis=1).tolist() == [round(0.25 * v.shape[1])] * v.shape[0] for v in frac.values())
    again = components.random_like(ref, 3)  # seeded: the run's draw again
    assert all((np.asarray(again[t]) == np.asarray(rnd[t])).all() for t in components.TYPES)
    a, b = components.random_like(frac, 1), components.random_like(frac, 2)
    assert components.per_layer(a) == components.per_layer(b) == components.per_layer(frac)
    assert any((a[t] != b[t]).any() for t in components.TYPES)


def _model_cfg():
    import cca_jax

    return cca_jax.load_model(runconfig.load(CONFIG).model)[0].config


def test_random_circuit_config_errors(capsys):
    assert cli.main(["run", str(CONFIG), "--set", "localize=random"]) == 2
    assert "random.like" in capsys.readouterr().err
    assert cli.main(["run", str(CONFIG), "--set", "localize=random", "--set", "random.fraction=2"]) == 2
    assert "random.fraction" in capsys.readouterr().err


def test_sweep_two_seeds_two_methods_writes_the_aggregate(tmp_path, capsys, monkeypatch):
    import cca_jax

    loads = []
    real_load = cca_jax.load_model
    monkeypatch.setattr(cca_jax, "load_model", lambda *a, **k: loads.append(a) or real_load(*a, **k))
    out = tmp_path / "sweep"
    args = ["sweep", str(CONFIG), "--seeds", "0,1", "--vary", "localize=dcm,random", "--out", str(out), "--quiet"]
    for o in FAST:
        args += ["--set", o]
    assert cli.main(args) == 0
    assert len(loads) == 1  # four runs, one model load
    agg = json.loads((out / "sweep.json").read_text())
    assert set(agg["variants"]) == {"localize=dcm", "localize=random"}
    for v in agg["variants"].values():
        assert v["seeds"] == [0, 1] and len(v["gain_per_seed"]) == 2
        assert v["gain_ci"][0] <= v["mean_gain"] <= v["gain_ci"][1]
    (pair,) = agg["pairs"]
    assert pair["seeds"] == [0, 1] and 0 <= pair["p_value_bootstrap"] <= 1 and len(pair["mcnemar_per_seed"]) == 2
    # the random circuit of each seed has its DCM twin's per-layer sizes
    for seed in (0, 1):
        a = components.load(out / "localize=dcm" / f"seed{seed}" / "stages" / "circuit" / "mask.npz")
        b = components.load(out / "localize=random" / f"seed{seed}" / "stages" / "circuit" / "mask.npz")
        assert components.per_layer(a) == components.per_layer(b)
    # the base evaluation of seed 1's random run was copied from its DCM sibling and reused
    done = lambda v: (out / v / "seed1" / "stages" / "base_eval" / "done.json").read_text()
    assert done("localize=dcm") == done("localize=random")
    assert (out / "sweep.md").read_text().count("| localize=") >= 3
    assert (out / "sweep.png").stat().st_size > 1000
    assert "Paired comparisons" in capsys.readouterr().out
    # the same aggregate from the finished runs alone (seeds run as separate processes), no model loaded
    first = (out / "sweep.json").read_text()
    (out / "sweep.json").unlink()
    assert cli.main(args + ["--aggregate-only"]) == 0
    assert len(loads) == 1 and json.loads((out / "sweep.json").read_text()) == json.loads(first)
    assert cli.main([a if a != "0,1" else "0,1,2" for a in args] + ["--aggregate-only"]) == 2
    err = capsys.readouterr().err
    assert "2 of 6 runs" in err and "seed 2" in err and len(err.strip().splitlines()) == 1
    # compare shows the paired statistics of runs sharing test items
    runs = [str(out / "localize=dcm" / "seed0"), str(out / "localize=random" / "seed0")]
    assert cli.main(["compare", *runs, "--out", str(tmp_path / "cmp")]) == 0
    cmp = json.loads((tmp_path / "cmp" / "compare.json").read_text())
    (p,) = cmp["paired"]
    assert p["n_items"] > 0 and "mcnemar" in p
    assert "Paired on the same test items" in (tmp_path / "cmp" / "compare.md").read_text()


def test_sweep_plans_full_finetuning_once_beside_dcm_and_random_circuits(tmp_path):
    """Issue 22's runs in one sweep: DCM, a random circuit of its size, and full fine-tuning,
    which finds no circuit and so runs once per seed, not once per localizer."""
    from cca_jax import sweep

    out = tmp_path / "sweep"
    runs = sweep.plan(str(CONFIG), [0, 1], sweep.parse_vary(["localize=dcm,random", "method=cca,sft_full"]),
                      [], out)
    assert [(name, seed) for name, seed, _, _ in runs] == [
        (v, s) for s in (0, 1) for v in ("localize=dcm,method=cca", "method=sft_full", "localize=random,method=cca")]
    for name, seed, run_dir, ov in runs:
        assert run_dir == out / name / f"seed{seed}"
        if name.startswith("localize=random"):  # its size: the cca DCM run of the same seed
            assert f"random.like={out / 'localize=dcm,method=cca' / f'seed{seed}'}" in ov
        if name == "method=sft_full":
            assert not any(o.startswith("localize=") for o in ov)
    for bad in ("localize", "localize=", "=dcm,random", "localize=dcm,", "localize=,random"):
        with pytest.raises(CCAError, match="--vary takes key=value1,value2"):
            sweep.parse_vary([bad])
    # a config whose own method is fine-tuning: varying the localizer alone runs it once
    single = sweep.plan(str(CONFIG), [0], sweep.parse_vary(["localize=dcm,random"]), ["method=sft_full"], out)
    assert [name for name, _, _, _ in single] == ["base"]


def test_faithfulness_of_full_empty_and_real_circuits(dcm_run):
    import cca_jax
    from cca_jax.cca import examples as ex_lib
    from cca_jax.cca.faithfulness import faithfulness

    cfg, d, s = dcm_run
    model, _ = cca_jax.load_model(cfg.model)
    exs = ex_lib.load(d / "stages" / "localize" / "examples.jsonl")
    full = components.binarize(components.full(model.config))
    empty = {k: np.zeros_like(v) for k, v in full.items()}
    f_full, f_empty = faithfulness(model, exs, full, 4), faithfulness(model, exs, empty, 4)
    assert f_full["fraction"] == pytest.approx(1.0, abs=1e-5)  # nothing ablated
    assert f_empty["ld_circuit"] == pytest.approx(f_empty["ld_all_ablated"], abs=1e-5)
    # the full model's LD from plain forwards
    b = ex_lib.make_batch(exs)
    lg = np.asarray(model(jax_np(b.tokens), mask=jax_np(b.mask)).logits[:, -1])
    rows = np.arange(len(exs))
    assert f_full["ld_full"] == pytest.approx(float(np.mean(lg[rows, b.desired] - lg[rows, b.undesired])), abs=1e-4)
    assert s["faithfulness"]["examples"] == len(exs) and s["faithfulness"]["ld_full"] == pytest.approx(
        f_full["ld_full"], abs=1e-4)
    half = faithfulness(model, exs, components.random_fraction(model.config, 0.5, 0), 4)
    assert half["ld_circuit"] != pytest.approx(half["ld_full"], abs=1e-6)
    assert half["ld_circuit"] != pytest.approx(half["ld_all_ablated"], abs=1e-6)


def jax_np(x):
    import jax.numpy as jnp

    return jnp.asarray(x)


def test_dcm_target_fraction_searches_reg(dcm_run):
    """dcm.target_fraction: bisection of reg (one DCM run per probe) toward the target;
    a stronger reg keeps fewer components; the closest run is the circuit."""
    import cca_jax
    from cca_jax.cca import dcm, dcm_size
    from cca_jax.cca import examples as ex_lib

    cfg, d, _ = dcm_run
    model, _ = cca_jax.load_model(cfg.model)
    exs = ex_lib.load(d / "stages" / "localize" / "examples.jsonl")
    c = runconfig.load(CONFIG, ["dcm.target_fraction=0.3", "dcm.epochs=8", "dcm.target_max_runs=6"]).dcm
    logs = []
    res, hist = dcm_size.train_mask_of_size(model, exs, c, progress=False, log=logs.append)
    runs = hist["runs"]
    assert 1 <= len(runs) <= 6 and len(logs) == len(runs)
    total = components.total(model.config)
    assert hist["fraction"] == components.count(res.mask) / total
    assert abs(hist["fraction"] - 0.3) == min(abs(r["fraction"] - 0.3) for r in runs)
    by_reg = sorted(runs, key=lambda r: r["reg"])
    assert by_reg[0]["fraction"] >= by_reg[-1]["fraction"]  # more L1, fewer components
    assert abs(hist["fraction"] - 0.3) < abs(runs[0]["fraction"] - 0.3) or len(runs) == 1
    with pytest.raises(Exception, match="target_fraction"):
        dcm.DCMConfig(target_fraction=1.5)
