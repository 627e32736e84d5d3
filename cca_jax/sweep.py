"""``cca-jax sweep``: one config over several seeds and method variants, each combination a
run of its own, then an aggregate: per variant the mean test gain over seeds with a 95%
interval over seeds and items, and for every pair of variants a paired test on the same
test items.

A seed sets every source of randomness after the data split (pivot sampling, DCM batch
order, the random circuit, fine-tuning batches and init), so every run of a sweep is
scored on the same test items and any two can be compared item by item. Finished stages
a run shares with an earlier one of the same seed (the base evaluation, the pivots) are
copied from it; their keys decide whether they are reused. A random circuit without
``random.like`` or ``random.fraction`` takes the size of the DCM circuit of the same seed
and settings.
"""

from __future__ import annotations

import itertools
import json
import shutil
from pathlib import Path
from typing import Callable, Sequence

import yaml

from cca_jax import atomic, runconfig
from cca_jax.errors import CCAError
from cca_jax.evaluate import gsm, paired

SEED_FIELDS = ("pivots.seed", "dcm.seed", "random.seed", "sft.seed")
SHARED_STAGES = ("base_eval", "localize", "side_effects_before")


def parse_vary(items: Sequence[str]) -> dict[str, list]:
    """``key=v1,v2`` (repeatable) -> {key: [v1, v2]} (values parsed as YAML)."""
    out = {}
    for item in items:
        key, _, values = item.partition("=")
        if not key.strip() or any(not v.strip() for v in values.split(",")):  # also no "=" at all
            raise CCAError(f"--vary takes key=value1,value2,..., got {item!r}")
        out[key.strip()] = [yaml.safe_load(v) for v in values.split(",")]
    return out


def combinations(vary: dict[str, list], base_method: str = "cca") -> list[dict]:
    """Every combination; DCM circuits before random ones (those may take their size). A
    fine-tuning method (``method`` other than cca, varied or the config's) finds no
    circuit: it runs once, not once per ``localize`` value."""
    keys = list(vary)
    combos: list[dict] = []
    for vals in itertools.product(*(vary[k] for k in keys)):
        combo = dict(zip(keys, vals))
        if "localize" in combo and combo.get("method", base_method) != "cca":
            del combo["localize"]
        if combo not in combos:
            combos.append(combo)
    return sorted(combos or [{}], key=lambda c: c.get("localize") == "random")


def label(combo: dict) -> str:
    return ",".join(f"{k}={v}" for k, v in combo.items()) or "base"


def _dir_name(combo: dict) -> str:
    return "".join(ch if ch.isalnum() or ch in "=.,_-" else "_" for ch in label(combo))


def plan(config: str, seeds: Sequence[int], vary: dict[str, list], overrides: Sequence[str], out: Path) -> list:
    """[(label, seed, run_dir, overrides)], every config checked before any run starts."""
    combos, runs = combinations(vary, runconfig.load(config, list(overrides)).method), []
    for seed in seeds:
        for combo in combos:
            ov = list(overrides) + [f"{f}={seed}" for f in SEED_FIELDS] + [f"{k}={v}" for k, v in combo.items()]
            if _needs_like(combo, ov):
                twin = {**combo, "localize": "dcm"}
                if twin not in combos:
                    raise CCAError(f"{label(combo)}: a random circuit needs random.like or random.fraction, or a "
                                   f"dcm run to match (add dcm to --vary localize=...)")
                ov.append(f"random.like={out / _dir_name(twin) / f'seed{seed}'}")
            runconfig.load(config, ov)
            runs.append((label(combo), seed, out / _dir_name(combo) / f"seed{seed}", ov))
    return runs


def _needs_like(combo: dict, overrides: list[str]) -> bool:
    return combo.get("localize") == "random" and not any(
        o.startswith(("random.like=", "random.fraction=")) for o in overrides)


def run(config: str, seeds: Sequence[int], vary: dict[str, list], out: str | Path, overrides: Sequence[str] = (),
        progress: bool = True, log: Callable[[str], None] = print) -> dict:
    from cca_jax import paths, pipeline, preflight

    out = paths.check_run_dir(Path(out), "--out")
    runs = plan(config, seeds, vary, overrides, out)
    log(f"sweep: {len(runs)} runs ({len(seeds)} seeds x {len(runs) // max(len(seeds), 1)} variants) into {out}")
    done: dict[int, Path] = {}
    loaded: dict = {}  # the model is loaded once for every run that reads it the same way
    for i, (name, seed, run_dir, ov) in enumerate(runs, 1):
        log(f"[{i}/{len(runs)}] {name}, seed {seed}: {run_dir}")
        cfg = runconfig.load(config, ov)
        key = (cfg.model, cfg.dtype, cfg.attention, cfg.tokenizer, cfg.mesh)
        if key not in loaded:
            preflight.check(cfg, run_dir)  # data, extras, output dir: before the model loads
            loaded.clear()  # one model in memory at a time
            loaded[key] = pipeline.load(cfg)
        if seed in done:
            _copy_shared(done[seed], run_dir)
        model, tok = loaded[key]
        pipeline.run(cfg, run_dir, model=model, tokenizer=tok, progress=progress, log=log)
        done.setdefault(seed, run_dir)
    return write_aggregate(out, [(name, seed, run_dir) for name, seed, run_dir, _ in runs])


def aggregate_only(config: str, seeds: Sequence[int], vary: dict[str, list], out: str | Path,
                   overrides: Sequence[str] = ()) -> dict:
    """The aggregate of a sweep's finished runs, without loading the model: e.g. after its
    seeds ran as separate processes (one per GPU) into the same ``--out``."""
    out = Path(out)
    runs = plan(config, seeds, vary, overrides, out)
    missing = [f"{name} seed {seed}" for name, seed, run_dir, _ in runs if not (run_dir / "summary.json").is_file()]
    if missing:
        raise CCAError(f"--aggregate-only: {len(missing)} of {len(runs)} runs in {out} are not finished "
                       f"({', '.join(missing[:4])}{', ...' if len(missing) > 4 else ''}): run the sweep without "
                       f"--aggregate-only to finish them")
    return write_aggregate(out, [(name, seed, run_dir) for name, seed, run_dir, _ in runs])


def _copy_shared(src: Path, dst: Path) -> None:
    """Finished stages of a sibling run with the same seed (their keys decide reuse)."""
    for name in SHARED_STAGES:
        s, d = src / "stages" / name, dst / "stages" / name
        if s.is_dir() and (s / "done.json").exists() and not d.exists():
            shutil.copytree(s, d)


def _records(run_dir: Path, stage: str) -> list[dict]:
    f = run_dir / "stages" / stage / "test.jsonl"
    if not f.is_file():
        raise CCAError(f"{run_dir}: no {stage} test records ({f}): not a finished run")
    return [json.loads(line) for line in f.read_text().splitlines() if line.strip()]


def aggregate(runs: Sequence[tuple[str, int, Path]]) -> dict:
    """Per variant the mean gain over seeds; per pair of variants the paired difference of
    their amplified models on the same items (over seeds)."""
    by_name: dict[str, list] = {}
    for name, seed, run_dir in runs:
        s = json.loads((run_dir / "summary.json").read_text())
        by_name.setdefault(name, []).append({"seed": seed, "dir": str(run_dir), "summary": s,
                                             "before": _records(run_dir, "base_eval"),
                                             "after": _records(run_dir, "test")})
    variants = {}
    for name, rs in by_name.items():
        rs.sort(key=lambda r: r["seed"])
        gain = paired.over_seeds([(r["before"], r["after"]) for r in rs])
        after = [gsm.accuracy(r["after"]).overall for r in rs]
        variants[name] = {
            "seeds": [r["seed"] for r in rs], "runs": [r["dir"] for r in rs],
            "mean_gain": gain["mean_delta"], "gain_ci": gain["ci"], "gain_p_value": gain["p_value"],
            "gain_per_seed": gain["delta_per_seed"],
            "test_after_mean": sum(after) / len(after),
            "test_before_mean": sum(gsm.accuracy(r["before"]).overall for r in rs) / len(rs),
            "fraction_components_mean": sum(r["summary"].get("fraction_components", 1.0) for r in rs) / len(rs),
            "faithfulness_mean": _mean([r["summary"].get("faithfulness", {}).get("fraction") for r in rs]),
        }
    pairs = []
    names = list(by_name)
    for i, a in enumerate(names):
        for b in names[i + 1:]:
            ra = {r["seed"]: r for r in by_name[a]}
            rb = {r["seed"]: r for r in by_name[b]}
            common = sorted(set(ra) & set(rb))
            if not common:
                continue
            res = paired.over_seeds([(ra[s]["after"], rb[s]["after"]) for s in common])
            pooled = {k: sum(m[k] for m in res["mcnemar_per_seed"]) for k in ("a_only", "b_only")}
            pairs.append({"a": a, "b": b, "seeds": common, "delta_b_minus_a": res["mean_delta"], "ci": res["ci"],
                          "p_value_bootstrap": res["p_value"], "mcnemar_per_seed": res["mcnemar_per_seed"],
                          "discordant_pooled": pooled})
    return {"variants": variants, "pairs": pairs}


def _mean(xs):
    xs = [x for x in xs if x is not None]
    return sum(xs) / len(xs) if xs else None


def markdown(agg: dict) -> str:
    lines = ["# Sweep", "", "Mean test gain (after - before) over seeds, 95% interval over seeds and items "
             "(bootstrap), p-value of no gain:", "",
             "| variant | seeds | components | before | after | gain | 95% CI | p |", "|---|---|---|---|---|---|---|---|"]
    for name, v in agg["variants"].items():
        lines.append(f"| {name} | {len(v['seeds'])} | {100 * v['fraction_components_mean']:.2f}% | "
                     f"{v['test_before_mean']:.3f} | {v['test_after_mean']:.3f} | {v['mean_gain']:+.3f} | "
                     f"[{v['gain_ci'][0]:+.3f}, {v['gain_ci'][1]:+.3f}] | {v['gain_p_value']:.3g} |")
    if agg["pairs"]:
        lines += ["", "Paired comparisons of the amplified models on the same test items (B - A, averaged over "
                  "seeds; bootstrap over seeds and items; exact McNemar per seed):", "",
                  "| A | B | B - A | 95% CI | p (bootstrap) | McNemar p per seed |", "|---|---|---|---|---|---|"]
        for p in agg["pairs"]:
            mc = ", ".join(f"{m['p_value']:.3g}" for m in p["mcnemar_per_seed"])
            lines.append(f"| {p['a']} | {p['b']} | {p['delta_b_minus_a']:+.3f} | [{p['ci'][0]:+.3f}, "
                         f"{p['ci'][1]:+.3f}] | {p['p_value_bootstrap']:.3g} | {mc} |")
    return "\n".join(lines) + "\n"


def plot(agg: dict, path: Path) -> None:
    """Gains with intervals per variant, and test accuracy against circuit size."""
    import matplotlib.pyplot as plt

    from cca_jax.atomic import save_figure

    names = list(agg["variants"])
    v = [agg["variants"][n] for n in names]
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(11, 4))
    g = [x["mean_gain"] for x in v]
    err = [[x["mean_gain"] - x["gain_ci"][0] for x in v], [x["gain_ci"][1] - x["mean_gain"] for x in v]]
    ax1.bar(range(len(names)), g, yerr=err, capsize=4, color="tab:blue")
    ax1.axhline(0, color="k", lw=0.8)
    ax1.set_xticks(range(len(names)), names, rotation=20, ha="right", fontsize=8)
    ax1.set_ylabel("test accuracy gain (95% CI)")
    for x in v:
        fr = [s * 100 for s in [x["fraction_components_mean"]]]
        ax2.scatter(fr, [x["test_after_mean"]], s=30)
    for n, x in zip(names, v):
        ax2.annotate(n, (100 * x["fraction_components_mean"], x["test_after_mean"]), fontsize=7)
    ax2.set_xlabel("circuit size (% of components)")
    ax2.set_ylabel("test accuracy after (mean over seeds)")
    fig.tight_layout()
    save_figure(fig, path)


def write_aggregate(out: Path, runs) -> dict:
    agg = aggregate(runs)
    atomic.write_json(out / "sweep.json", agg)
    atomic.write_text(out / "sweep.md", markdown(agg))
    try:
        plot(agg, out / "sweep.png")
    except ImportError:  # matplotlib is in the [viz] extra
        pass
    return agg
