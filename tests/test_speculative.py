"""Exact speculative decoding: greedy token-identical to transformers and to plain decoding,
sampling with plain sampling's distribution, per-row acceptance, drafts, configuration.

Kept small: most tests share one prompt batch, budget and draft length, so their compiled
programs are reused across tests (a tiny model's compile is most of a test's time)."""

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import tiny
from scipy import stats as scipy_stats

import cca_jax
from cca_jax import preflight, runconfig, speculative
from cca_jax.errors import CCAError
from cca_jax.generate import Sampling, filter_logits, generate

SPEC = {"speculative": "ngram", "spec_k": 3, "spec_iters": 2}
NEW = 16  # tokens per row


def _prompts():
    return tiny.prompt_batch(8, seed=11)  # ragged: rows left-padded by different amounts


@pytest.fixture(scope="module")
def loaded(hf_dirs):
    return {fam: cca_jax.load_model(d)[0] for fam, (_, d) in hf_dirs.items()}


@pytest.mark.parametrize("family", tiny.FAMILIES)
def test_greedy_token_identical_to_transformers(hf_dirs, loaded, family):
    prompts = _prompts()
    assert len({len(p) for p in prompts}) > 1
    got = generate(loaded[family], prompts, NEW, eos_token_id=[], **SPEC)
    st = speculative.last_stats()
    assert got == tiny.hf_greedy(hf_dirs[family][0], prompts, NEW)
    assert st.steps > 0 and st.tokens == 8 * NEW and st.steps / 8 <= st.iterations <= NEW - 1


def test_rows_advance_by_different_amounts(hf_dirs, loaded, monkeypatch):
    """After the first verify call rows hold different numbers of tokens (each kept its own
    draft prefix), the output is still greedy's, and the device ran exactly the verify
    steps the slowest row needed (a call stops once every row is done)."""
    views = []
    real = speculative.verify_chunk

    def spy(*args, **kw):
        state, view = real(*args, **kw)
        views.append([np.asarray(v) for v in view])
        return state, view

    monkeypatch.setattr(speculative, "verify_chunk", spy)
    prompts = _prompts()
    got = generate(loaded["gemma2"], prompts, NEW, eos_token_id=[], **SPEC)
    assert got == tiny.hf_greedy(hf_dirs["gemma2"][0], prompts, NEW)
    n = views[0][0]  # the first token, then 1 to k + 1 per verify step (2 steps per call)
    assert len(set(n.tolist())) > 1 and n.min() >= 3 and n.max() <= 9
    steps = views[-1][3]  # per row: the verify steps it took part in
    assert sum(int(v[5]) for v in views) == steps.max() > steps.min()
    assert speculative.last_stats().iterations == steps.max()


def test_eos_stop_rules_shared_prefix_options_and_draft_lengths(hf_dirs, loaded):
    """gemma2 (sliding window: positions must be right after the shared prefix): EOS, a
    stop rule, several batches, the cache read in place or written first, and draft
    lengths 1, 4, 7 give transformers' greedy tokens, cut as plain decoding cuts them;
    drafts are kept along the way."""
    rng = np.random.default_rng(1)
    shared = list(rng.integers(3, tiny.VOCAB, size=10))
    prompts = [shared + list(rng.integers(3, tiny.VOCAB, size=int(rng.integers(1, 12)))) for _ in range(11)]
    free = tiny.hf_greedy(hf_dirs["gemma2"][0], prompts, NEW)
    eos = free[0][5]  # a token row 0 emits: its row (and others) end early

    def stop(ids):
        return 4 if len(ids) >= 6 else None

    def cut(row, eos_id, rule):  # EOS kept; the stop rule's cut once a row reaches 6 tokens
        row = row[:row.index(eos_id) + 1] if eos_id in row else row
        return row[:rule(row)] if rule is not None and rule(row) is not None else row

    cases = [(1, 1, {"eos_token_id": eos, "write_first": False}), (4, 3, {"stop": stop, "batch_size": 4}),
             (7, 2, {"eos_token_id": eos, "stop": stop, "ahead": False, "share_prefix": False})]
    accepted = 0
    for k, iters, kw in cases:
        kw = {"eos_token_id": [], "min_shared_prefix": 4, **kw}
        want = [cut(r, kw["eos_token_id"], kw.get("stop")) for r in free]
        got = generate(loaded["gemma2"], prompts, NEW, speculative="ngram", spec_k=k, spec_iters=iters, **kw)
        assert got == want, (kw, k)
        accepted += speculative.last_stats().accepted
    assert any(len(r) < 4 for r in got) and any(len(r) == 4 for r in got)  # EOS and the stop rule both cut
    assert accepted > 30


def test_draft_model_all_kept_or_none_kept(hf_dirs, loaded):
    """speculative: model. The model as its own draft: every draft kept (k + 1 tokens per
    step: the draft cache holds what the verify step kept); another model of the same
    vocabulary as draft: the same tokens anyway."""
    model, prompts = loaded["llama"], _prompts()
    want = tiny.hf_greedy(hf_dirs["llama"][0], prompts, NEW)
    got = generate(model, prompts, NEW, eos_token_id=[], speculative="model", draft_model=model, spec_k=3)
    st = speculative.last_stats()
    assert got == want and st.acceptance == 1.0 and st.tokens_per_step == 4.0
    other = generate(model, prompts, NEW, eos_token_id=[], speculative="model", draft_model=loaded["qwen2"], spec_k=3)
    assert other == want


def test_ngram_drafts():
    """The latest earlier occurrence of the longest matching suffix, and what followed it;
    a pattern that runs into the present repeats; no match drafts 0."""
    no = -1
    toks = jnp.asarray([
        [no, no, 5, 6, 7, 8, 9, 5, 6, 7, 1, 2, 6, 7],  # suffix 6 7: latest match at slot 9 -> 1 2 6
        [no, 4, 4, 4, 4, 4, 4, 4, 4, 4, 4, 4, 4, 4],
        [no, 1, 2, 3, 1, 2, 3, 1, no, no, no, no, no, no],  # last = 7: period 3 repeats into the present
        [no, no, no, no, no, 10, 11, 12, 13, no, no, no, no, no],  # last = 8: no match
    ], jnp.int32)
    drafts = jax.jit(speculative.ngram_drafts, static_argnums=(2, 3))  # one compile, not one per operation
    last = jnp.asarray([13, 13, 7, 8])
    d = np.asarray(drafts(toks, last, 3, 3))
    assert d[0].tolist() == [1, 2, 6]
    assert d[1].tolist() == [4, 4, 4]
    assert d[2].tolist() == [2, 3, 1]
    assert d[3].tolist() == [0, 0, 0]
    # the longest suffix wins over a later, shorter one: ... 3 4 5 | ... 9 5 | ... 3 4 5 -> after the first
    toks2 = jnp.asarray([[3, 4, 5, 20, 21, 9, 5, 30, 31, 3, 4, 5]], jnp.int32)
    assert np.asarray(drafts(toks2, jnp.asarray([11]), 2, 3))[0].tolist() == [20, 21]
    assert np.asarray(drafts(toks2, jnp.asarray([11]), 2, 1))[0].tolist() == [30, 31]


def test_rejection_rule_keeps_the_distribution():
    """One position, a point-mass draft d: the emitted token is distributed as p (chi-square
    over 20,000 rows) and d is kept with probability p(d)."""
    p = np.asarray([0.4, 0.25, 0.2, 0.1, 0.05])
    B = 20000
    logits = jnp.broadcast_to(jnp.log(jnp.asarray(p, jnp.float32)), (B, 2, 5))
    for d in (0, 3):
        drafts = jnp.full((B, 1), d, jnp.int32)
        kept, emit = speculative._accept_sampled(logits, drafts, Sampling(1.0), jax.random.key(d))
        first = np.asarray(emit[:, 0])
        counts = np.bincount(first, minlength=5)
        assert scipy_stats.chisquare(counts, p * B).pvalue > 1e-3
        assert abs(float(np.mean(np.asarray(kept))) - p[d]) < 0.02
        np.testing.assert_array_equal(np.asarray(kept) == 1, first == d)  # d only when kept


def _exact_joint(model, prompt, sampling, n):
    """Exact probabilities of every sequence of the first n sampled tokens: per depth one
    forward over all sequences of that depth, left-padded to one compiled shape."""
    width, rows = len(prompt) + n - 1, sampling.top_k ** (n - 1)
    next_probs = jax.jit(lambda t, m: jax.nn.softmax(
        filter_logits(model(t, mask=m).logits[:, -1], sampling), axis=-1))
    joint = {(): 1.0}
    for _ in range(n):
        seqs = list(joint)
        toks, mask = np.zeros((rows, width), np.int32), np.zeros((rows, width), bool)
        for i, s in enumerate(seqs):
            row = list(prompt) + list(s)
            toks[i, width - len(row):], mask[i, width - len(row):] = row, True
        p = np.asarray(next_probs(jnp.asarray(toks), jnp.asarray(mask)), np.float64)
        joint = {s + (int(t),): joint[s] * p[i, t] for i, s in enumerate(seqs) for t in np.flatnonzero(p[i] > 0)}
    return joint


def test_sampling_distribution_chi_square(loaded):
    """The first three sampled tokens (temperature 1, top-k 3) of 1,500 rows against their
    exact joint distribution; with speculation drafts are kept along the way (so the
    rejection rule, not only plain sampling, is what is tested)."""
    model = loaded["gemma2"]
    prompt = [5, 9, 17, 5, 9, 17, 5, 9]
    exact = _exact_joint(model, prompt, Sampling(1.0, top_k=3), 3)
    N = 1500
    outs = generate(model, [prompt] * N, 3, eos_token_id=[], temperature=1.0, top_k=3, key=jax.random.key(3),
                    batch_size=N, speculative="ngram", spec_k=3)
    seqs = list(exact)
    observed = np.asarray([sum(tuple(o) == s for o in outs) for s in seqs], float)
    assert observed.sum() == N  # nothing outside the support
    expected = np.asarray([exact[s] for s in seqs]) * N
    big = expected >= 5
    o = np.append(observed[big], observed[~big].sum()) if (~big).any() else observed[big]
    e = np.append(expected[big], expected[~big].sum()) if (~big).any() else expected[big]
    assert scipy_stats.chisquare(o, e * o.sum() / e.sum()).pvalue > 1e-3
    assert speculative.last_stats().accepted > 300


# -- a real model, through the CLI -----------------------------------------------------------

@pytest.fixture(scope="module")
def smollm2():
    path = tiny.smollm2_path()
    model, tok = cca_jax.load_model(path)
    return path, model, tok


def test_cli_eval_smollm2_gsm_prompts_identical_and_drafts_kept(smollm2, tmp_path, monkeypatch):
    """``cca-jax eval --speculative ngram --spec-k 4`` on real GSM few-shot prompts (EOS and
    the evaluation's stop rule) generates speculatively and writes the tokens
    ``--speculative off`` writes (plain greedy, itself token-identical to transformers on
    SmolLM2: test_gguf); chain-of-thought copies from the question, so drafts are kept."""
    from cca_jax import cli
    from cca_jax import generate as gen

    seen = []
    real = gen.generate_with

    def spy(model, prompts, config, **kw):
        seen.append(config)
        return real(model, prompts, config, **kw)

    monkeypatch.setattr(gen, "generate_with", spy)
    monkeypatch.setattr(cca_jax, "load_model", lambda *a, **k: smollm2[1:])  # loaded once for the module
    runs = {}
    for how in (["--speculative", "ngram", "--spec-k", "4"], ["--speculative", "off"]):
        out = tmp_path / how[1]
        assert cli.main(["eval", "--model", str(smollm2[0]), "--limit", "3", "--shots", "1", "--max-new-tokens",
                         "40", *how, "--out", str(out)]) == 0
        runs[how[1]] = [json.loads(line)["generated_tokens"] for line in (out / "items.jsonl").open()]
        if how[1] == "ngram":
            st = speculative.last_stats()
    assert [(c.speculative, c.spec_k, c.spec_ngram) for c in seen] == [("ngram", 4, 3), ("off", 4, 3)]
    assert runs["ngram"] == runs["off"] and sum(map(len, runs["off"])) > 60
    assert st.acceptance > 0.08 and st.tokens_per_step > 1.3, st  # 0.12 and 1.48 on this CPU


# -- configuration ------------------------------------------------------------------------

def test_generate_rejects_bad_speculation_options(loaded):
    model = loaded["llama"]
    for kw, msg in (({"speculative": "fast"}, "speculative must be one of"),
                    ({"speculative": "ngram", "spec_k": 0}, "spec_k must be an integer >= 1"),
                    ({"speculative": "ngram", "spec_ngram": True}, "spec_ngram must be an integer >= 1"),
                    ({"speculative": "model"}, "needs a draft model")):
        with pytest.raises(CCAError, match=msg):
            generate(model, [[3, 4]], 4, **kw)


def test_generation_settings_in_run_configs(tmp_path):
    cfg = runconfig.load(tiny.CONFIG, ["generation.speculative=ngram", "generation.k=6"])
    assert (cfg.generation.speculative, cfg.generation.k, cfg.generation.ngram) == ("ngram", 6, 3)
    assert cfg.generation.options() == {"speculative": "ngram", "spec_k": 6, "spec_ngram": 3}
    # sampled pivots depend on the speculative settings: they are part of that stage's key
    assert cfg.generation.sampler() == {"speculative": "ngram", "k": 6, "ngram": 3}
    # auto: off on every backend (measured slower than plain decoding on an H200 and the CPU)
    auto = runconfig.load(tiny.CONFIG).generation
    assert auto.options()["speculative"] == "off"
    assert auto.sampler() is None
    for override, msg in (("generation.speculative=fast", "generation.speculative must be one of auto, off"),
                          ("generation.k=0", "generation.k must be >= 1"),
                          ("generation.k=17", "generation.k must be <= 16"),
                          ("generation.ngram=2.5", "generation.ngram must be an integer"),
                          ("generation.speculative=model", "generation.speculative: model needs generation.draft"),
                          ("generation.drafts=x", "unknown key")):
        with pytest.raises(CCAError, match=msg):
            runconfig.load(tiny.CONFIG, [override])


def test_preflight_checks_the_draft_model_source(tmp_path, monkeypatch):
    """generation.speculative: model: the draft's source is checked before anything loads."""
    monkeypatch.chdir(tmp_path)
    cfg = runconfig.load(tiny.CONFIG, ["generation.speculative=model", "generation.draft=/no/such/draft"])
    with pytest.raises(CCAError, match="generation.draft /no/such/draft: no such file or directory"):
        preflight.check(cfg, tmp_path / "run")
    assert list(tmp_path.iterdir()) == []
    ok = runconfig.load(tiny.CONFIG, ["generation.speculative=model", f"generation.draft={cfg.model}"])
    preflight.check(ok, tmp_path / "run")  # the tiny run's model YAML: a source that exists


@pytest.mark.parametrize("argv, msg", [
    (["--speculative", "fast"], "--speculative must be one of"),
    (["--spec-k", "0"], "--spec-k must be >= 1"),
    (["--speculative", "model"], "--speculative: model needs --draft"),
])
@pytest.mark.parametrize("command", ["eval", "bench-tasks"])
def test_cli_generation_options_bad_input(tmp_path, capsys, command, argv, msg):
    out = tmp_path / "out"
    base = (["eval", "--model", str(tmp_path / "none"), "--limit", "2", "--out", str(out)] if command == "eval"
            else ["bench-tasks", "--model", str(tmp_path / "none"), "--out", str(out / "r.json")])
    tiny.cli_error(capsys, base + argv, msg)
    assert not out.exists()
