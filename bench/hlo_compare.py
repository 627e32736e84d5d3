"""The compiled CPU HLO of the model's hot-path programs, at two commits, compared.

    python bench/hlo_compare.py --ref REV            # REV's tree (git archive) against this one
    python bench/hlo_compare.py --dump DIR [--src D] # write DIR/<program>.hlo.txt for one tree
    python bench/hlo_compare.py --compare A B        # compare two dump folders

A refactoring of the forward pass, the cache modes or the callers around them should leave
these programs as they were: each is lowered and compiled on CPU
(``jax.jit(...).lower(...).compile().as_text()``) on a tiny gemma2-shaped and a tiny
llama-shaped config, and the texts are compared after normalisation (the module name and
``metadata={...}``, i.e. source lines and op names, are dropped). Programs: a prefill into
an empty cache and into a cache that holds a prefix (scoring), a decode step in both cache
forms (write-first, read in place), a decode chunk of ``generate``, the DCM prefix cache
and mask step, the amplification gradient (scanned, scanned with remat, unrolled), a
vmapped patching chunk and a forward that collects activations under an intervention.

Older trees named some entry points differently; ``_pick`` takes the first name a tree
has, so that the pre-refactoring commit can be dumped with this script too.
"""

from __future__ import annotations

import argparse
import difflib
import inspect
import os
import re
import subprocess
import sys
import tempfile
from pathlib import Path

os.environ.setdefault("JAX_PLATFORMS", "cpu")


def _pick(module, *names):
    for n in names:
        if hasattr(module, n):
            return getattr(module, n)
    raise AttributeError(f"{module.__name__} has none of {names}")


def _configs():
    from cca_jax.config import ModelConfig, RopeConfig

    common = dict(vocab_size=96, hidden_size=48, num_layers=3, num_heads=4, num_kv_heads=2, head_dim=16,
                  intermediate_size=80)
    gemma2 = ModelConfig(family="gemma2", **common, hidden_act="gelu_pytorch_tanh", norm_plus_one=True,
                         post_attn_norm=True, post_mlp_norm=True, embed_scale=True, query_pre_attn_scalar=24,
                         attn_logit_softcap=5.0, final_logit_softcap=3.0, sliding_window=4,
                         sliding_layers=(True, False, True), tie_word_embeddings=True)
    llama = ModelConfig(family="llama", **common, rms_norm_eps=1e-5,
                        rope=RopeConfig(theta=500000.0, type="llama3", factor=8.0,
                                        original_max_position_embeddings=16))
    return {"gemma2": gemma2, "llama": llama}


def _programs(name, cfg):
    """{program name: (jitted function, args[, keyword args])} for one config."""
    import jax
    import jax.numpy as jnp
    import numpy as np
    from flax import nnx

    from cca_jax import generate as gen
    from cca_jax.cca import amplify, components, dcm, patching
    from cca_jax.cca.examples import LocalizationExample, make_batch
    from cca_jax.evaluate import loglik
    from cca_jax.model import cache as cache_mod
    from cca_jax.model.transformer import Transformer, forward, unstack_layers

    try:
        from cca_jax.model import prefill as prefill_mod
    except ImportError:
        prefill_mod = gen
    prefill = _pick(prefill_mod, "prefill", "_prefill")
    prefix_cache = _pick(prefill_mod if prefill_mod is not gen else dcm, "prefix_cache")
    decode = _pick(gen, "decode_chunk", "_decode")
    tile = _pick(cache_mod if hasattr(cache_mod, "tile_cache") else gen, "tile_cache", "_tile_cache")

    model = Transformer(cfg, rngs=nnx.Rngs(0))
    stacked = model.params()
    per = unstack_layers(stacked)
    B, T, S = 4, 12, 32
    toks = jnp.asarray(np.random.default_rng(0).integers(3, cfg.vocab_size, (B, T)), jnp.int32)
    mask = jnp.ones((B, T), bool).at[1, :3].set(False)
    empty = cache_mod.init_cache(cfg, B, S)
    logits, filled = prefill(cfg, stacked, toks, mask, empty)
    one = jnp.zeros((B, 1), jnp.int32)
    out = {}

    out["prefill"] = (prefill, (cfg, stacked, toks, mask, empty))
    _, prefix = prefill(cfg, stacked, toks[:1, :8], jnp.ones((1, 8), bool), cache_mod.init_cache(cfg, 1, S))
    tiled = tile(prefix, B)
    out["score_after_prefix"] = (loglik._score, (cfg, stacked, toks, mask, tiled, jnp.zeros((B, 2), jnp.int32),
                                                 toks[:, :2]))
    for wf in (True, False):
        step = jax.jit(lambda p, t, c, m, wf=wf: forward(cfg, p, t, mask=m, cache=c, at=one, write_first=wf))
        out[f"decode_step_{'write_first' if wf else 'read'}"] = (step, (per, toks[:, :1], filled, mask[:, :1]))
    dkw = dict(steps=4, sampling=gen.Sampling())
    if "write_first" in inspect.signature(decode).parameters:
        dkw["write_first"] = True
    done, eos = jnp.zeros((B,), bool), jnp.asarray([2], jnp.int32)
    out["decode_chunk"] = (decode, (cfg, per, filled, logits, done, jax.random.key(0), eos, 0), dkw)

    rng = np.random.default_rng(1)
    exs = [LocalizationExample(tuple(int(t) for t in rng.integers(3, cfg.vocab_size, 9 + i)), 5 + i, 9 + i, 0, i)
           for i in range(B)]
    b = make_batch(exs)
    bt, bm = jnp.asarray(b.tokens), jnp.asarray(b.mask)
    d, u = jnp.asarray(b.desired), jnp.asarray(b.undesired)
    out["dcm_prefix_cache"] = (prefix_cache, (cfg, stacked, bt, bm))
    pc = prefix_cache(cfg, stacked, bt, bm)
    c = dcm.DCMConfig()
    opt = dcm.make_optimizer(c, 4)
    m0 = components.full(cfg, 1.0)
    for mode in ("fixed", "reference"):
        out[f"dcm_mask_step_{mode}"] = (dcm.mask_step, (cfg, opt, c.reg, mode, per, m0, opt.init(m0), pc, bt[:, -1], d,
                                                        u))

    acfg = amplify.AmplifyConfig()
    optimizer = amplify.make_optimizer(acfg, components.full(cfg, True), stacked)
    train, frozen = amplify.split_params(stacked, optimizer.selection)
    for label, remat, unroll in (("scan", False, False), ("scan_remat", True, False), ("unroll", False, True)):
        out[f"amplify_grad_{label}"] = (amplify.grad_sum, (train, frozen, cfg, bt, bm, d, u, remat, unroll))

    clean = patching.last_activations(cfg, per, pc, bt[:, -1])
    values = patching.patch_values(clean, "mean")
    out["patch_chunk"] = (patching._patch_chunk, (cfg, per, pc, bt[:, -1], d, u, values, jnp.arange(8)))

    from cca_jax.model.intervention import Intervention

    iv = Intervention(where=mask, scale={k: v * 0.5 for k, v in m0.items()})
    fwd = jax.jit(lambda p, t, m, iv: forward(cfg, p, t, mask=m, intervention=iv, collect=True))
    out["forward_collect_intervention"] = (fwd, (stacked, toks, mask, iv))
    return out


def _compile_text(fn, args, kw=None) -> str:
    return fn.lower(*args, **(kw or {})).compile().as_text()


def dump(out_dir: Path, only: str = "") -> None:
    out_dir.mkdir(parents=True, exist_ok=True)
    for name, cfg in _configs().items():
        for prog, (fn, *args) in _programs(name, cfg).items():
            if only not in f"{name}.{prog}":
                continue
            (out_dir / f"{name}.{prog}.hlo.txt").write_text(_compile_text(fn, *args))
            print("dumped", name, prog, flush=True)


# functions renamed by the refactoring whose names XLA copies into instruction names
RENAMED = {"_decode__locals__": "decode_chunk__locals__"}


def normalize(text: str) -> str:
    """Drop what names the source rather than the program: the module name, the source
    file/function/stack-frame tables, ``metadata={...}``, and the entry parameters' names
    (taken from the Python argument names; numbered instead)."""
    lines, skip = [], False
    for line in text.splitlines():
        if line == "FileNames":
            skip = True
        elif skip and (line.startswith("%") or line.startswith("ENTRY")):
            skip = False
        if not skip:
            lines.append(line)
    text = "\n".join(lines)
    text = re.sub(r"^HloModule \S+", "HloModule m", text, flags=re.M)
    text = re.sub(r",? ?metadata=\{[^{}]*\}", "", text)
    entry = re.search(r"^ENTRY \S+ \((.*)\) -> ", text, flags=re.M)
    names = re.findall(r"(?:^|, )([\w.\-]+): ", entry.group(1)) if entry else []
    for i, n in enumerate(names):
        text = re.sub(rf"(?<![\w.\-]){re.escape(n)}(?![\w\-]|\.\d)", f"arg{i}", text)
    for old, new in RENAMED.items():
        text = text.replace(old, new)
    return text


def renumber(text: str) -> str:
    """Instruction and computation ids (``add.98``) numbered by first appearance: a program
    that lowered one op more or fewer before (an op XLA removes anyway) numbers every later
    one differently; this compares the programs' structure."""
    ids: dict[str, str] = {}

    def sub(m):
        return ids.setdefault(m.group(0), f"{m.group(1)}#{len(ids)}")

    return re.sub(r"(?<![\w.])([A-Za-z_][\w\-]*?)(?:\.\d+)+(?![\w])", sub, text)


def compare(a: Path, b: Path) -> int:
    names = sorted({p.name for p in a.glob("*.hlo.txt")} | {p.name for p in b.glob("*.hlo.txt")})
    bad = 0
    for n in names:
        if not (a / n).exists() or not (b / n).exists():
            print(f"MISSING {n}")
            bad += 1
            continue
        x, y = normalize((a / n).read_text()), normalize((b / n).read_text())
        if x == y:
            print(f"same     {n} ({len(x.splitlines())} lines)")
            continue
        if renumber(x) == renumber(y):
            print(f"same after renumbering ids  {n} ({len(x.splitlines())} lines)")
            continue
        # the differences, ids dropped (one op more shifts every later id)
        x, y = (re.sub(r"(?<![\w.])([A-Za-z_][\w\-]*?)(?:\.\d+)+(?![\w])", r"\1", t) for t in (x, y))
        bad += 1
        diff = list(difflib.unified_diff(x.splitlines(), y.splitlines(), lineterm="", n=0))
        print(f"DIFFERS  {n}: {len(diff)} diff lines")
        print("\n".join(diff[:40]))
    print(f"{len(names) - bad} of {len(names)} programs identical")
    return 1 if bad else 0


def _dump_tree(src: Path, out: Path, only: str) -> None:
    env = dict(os.environ, PYTHONPATH=str(src))
    subprocess.run([sys.executable, __file__, "--dump", str(out), "--src", str(src), "--only", only], check=True,
                   env=env, cwd=src)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--dump", type=Path)
    ap.add_argument("--src", type=Path, help="the tree whose cca_jax to import (default: this one)")
    ap.add_argument("--compare", nargs=2, type=Path)
    ap.add_argument("--ref", help="a git revision to compare this tree against")
    ap.add_argument("--keep", type=Path, help="with --ref: write both dumps here")
    ap.add_argument("--only", default="", help="dump only the programs whose name contains this")
    args = ap.parse_args()
    root = Path(__file__).resolve().parent.parent
    sys.path.insert(0, str((args.src or root).resolve()))
    if args.dump:
        dump(args.dump, args.only)
    elif args.compare:
        sys.exit(compare(*args.compare))
    elif args.ref:
        with tempfile.TemporaryDirectory() as tmp:
            tmp = Path(tmp)
            keep = args.keep or tmp
            old = tmp / "old"
            old.mkdir()
            archive = subprocess.run(["git", "-C", str(root), "archive", args.ref, "cca_jax"], check=True,
                                     capture_output=True).stdout
            subprocess.run(["tar", "-x", "-C", str(old)], input=archive, check=True)
            _dump_tree(old, keep / "before", args.only)
            _dump_tree(root, keep / "after", args.only)
            sys.exit(compare(keep / "before", keep / "after"))
    else:
        ap.error("give --ref, --dump or --compare")


if __name__ == "__main__":
    main()
