"""Exact speculative decoding: greedy token-identical to plain decoding and to transformers,
sampling with plain sampling's distribution, drafts, configuration."""

import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from scipy import stats as scipy_stats
from test_generate import hf_greedy, prompt_batch

import cca_jax
import tiny
from cca_jax import cli, models, runconfig, speculative
from cca_jax.errors import CCAError
from cca_jax.generate import Sampling, filter_logits, generate

SPEC = dict(speculative="ngram", spec_k=3, spec_iters=2)


@pytest.fixture(scope="module")
def loaded(hf_dirs):
    return {fam: cca_jax.load_model(d)[0] for fam, (_, d) in hf_dirs.items()}


@pytest.mark.parametrize("family", tiny.FAMILIES)
def test_greedy_token_identical_to_plain_and_transformers(hf_dirs, loaded, family):
    hf, _ = hf_dirs[family]
    model = loaded[family]
    prompts = prompt_batch(8, seed=11)
    assert len({len(p) for p in prompts}) > 1  # ragged: rows left-padded by different amounts
    want = hf_greedy(hf, prompts, 16)
    got = generate(model, prompts, 16, eos_token_id=[], **SPEC)
    st = speculative.last_stats()
    assert got == want == generate(model, prompts, 16, eos_token_id=[])
    assert st.steps > 0 and st.tokens == 8 * 16


def test_many_prompts_eos_stop_rules_shared_prefix_and_draft_lengths(loaded):
    """gemma2 (sliding window: positions must be right after the shared prefix): EOS, a
    stop rule, several batches, the cache read in place or written first, and draft
    lengths 1, 4, 7 give plain decoding's tokens; drafts are kept along the way."""
    model = loaded["gemma2"]
    rng = np.random.default_rng(1)
    shared = list(rng.integers(3, tiny.VOCAB, size=10))
    prompts = [shared + list(rng.integers(3, tiny.VOCAB, size=int(rng.integers(1, 12)))) for _ in range(11)]
    free = generate(model, prompts, 16, eos_token_id=[], min_shared_prefix=4)
    eos = free[0][5]  # a token row 0 emits: its row (and others) end early

    def stop(ids):
        return 4 if len(ids) >= 6 else None

    cases = [(1, 1, dict(eos_token_id=eos, write_first=False)), (4, 3, dict(stop=stop, batch_size=4)),
             (7, 2, dict(eos_token_id=eos, stop=stop, ahead=False, share_prefix=False))]
    accepted = 0
    for k, iters, kw in cases:
        kw = {"eos_token_id": [], "min_shared_prefix": 4, **kw}
        want = generate(model, prompts, 16, **kw)
        got = generate(model, prompts, 16, speculative="ngram", spec_k=k, spec_iters=iters, **kw)
        assert got == want, (kw, k)
        accepted += speculative.last_stats().accepted
    assert got != [row[:4] for row in free]  # EOS and the stop rule both cut rows
    assert any(len(r) < 4 for r in got) and any(len(r) == 4 for r in got)
    assert accepted > 30


def test_rows_advance_by_different_amounts(loaded, monkeypatch):
    """After one verify step rows hold different numbers of tokens (each kept its own
    draft prefix), and the output is still plain decoding's."""
    model = loaded["gemma2"]
    prompts = prompt_batch(8, seed=3)
    counts = []
    real = speculative.verify_chunk

    def spy(*args, **kw):
        state, view = real(*args, **kw)
        counts.append(np.asarray(view[0]))
        return state, view

    monkeypatch.setattr(speculative, "verify_chunk", spy)
    got = generate(model, prompts, 14, eos_token_id=[], speculative="ngram", spec_k=4, spec_iters=1)
    assert got == generate(model, prompts, 14, eos_token_id=[])
    assert len(set(counts[0].tolist())) > 1  # 1 (first token) + 1..5 per row
    assert counts[0].min() >= 2 and counts[0].max() <= 6


def test_draft_model_all_kept_or_none_kept(loaded):
    """speculative: model. The model as its own draft: every draft kept (k + 1 tokens
    per step); another model of the same vocabulary as draft: the same tokens anyway."""
    model = loaded["llama"]
    prompts = prompt_batch(6, seed=5)
    want = generate(model, prompts, 13, eos_token_id=[])
    got = generate(model, prompts, 13, eos_token_id=[], speculative="model", draft_model=model, spec_k=3)
    st = speculative.last_stats()
    assert got == want and st.acceptance == 1.0 and st.tokens_per_step == 4.0
    other = generate(model, prompts, 13, eos_token_id=[], speculative="model", draft_model=loaded["qwen2"], spec_k=3)
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
    last = jnp.asarray([13, 13, 7, 8])
    d = np.asarray(speculative.ngram_drafts(toks, last, 3, 3))
    assert d[0].tolist() == [1, 2, 6]
    assert d[1].tolist() == [4, 4, 4]
    assert d[2].tolist() == [2, 3, 1]
    assert d[3].tolist() == [0, 0, 0]
    # the longest suffix wins over a later, shorter one: ... 3 4 5 | ... 9 5 | ... 3 4 5 -> after the first
    toks2 = jnp.asarray([[3, 4, 5, 20, 21, 9, 5, 30, 31, 3, 4, 5]], jnp.int32)
    assert np.asarray(speculative.ngram_drafts(toks2, jnp.asarray([11]), 2, 3))[0].tolist() == [20, 21]
    assert np.asarray(speculative.ngram_drafts(toks2, jnp.asarray([11]), 2, 1))[0].tolist() == [30, 31]


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
    """Exact probabilities of every sequence of the first n sampled tokens."""
    def dist(prefix):
        logits = model(jnp.asarray([prefix])).logits[0, -1]
        return np.asarray(jax.nn.softmax(filter_logits(logits[None], sampling)[0]), np.float64)

    joint = {(): 1.0}
    for _ in range(n):
        joint = {seq + (int(t),): q * pt for seq, q in joint.items()
                 for t, pt in enumerate(dist(list(prompt) + list(seq))) if pt > 0}
    return joint


def test_sampling_distribution_chi_square(loaded):
    """The first three sampled tokens (temperature 1, top-k 3) of 1,500 rows against their
    exact joint distribution; with speculation drafts are kept along the way (so the
    rejection rule, not only plain sampling, is what is tested)."""
    model = loaded["gemma2"]
    prompt = [5, 9, 17, 5, 9, 17, 5, 9]
    sampling = Sampling(1.0, top_k=3)
    exact = _exact_joint(model, prompt, sampling, 3)
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


@pytest.fixture(scope="module")
def smollm2():
    try:
        path = models.resolve("smollm2-135m")
    except CCAError as err:
        if os.environ.get("CI"):
            raise
        pytest.skip(str(err))
    model, tok = cca_jax.load_model(path)
    return path, model, tok


def test_smollm2_gsm_prompts_identical_and_drafts_kept(smollm2):
    """A real model on GSM few-shot prompts (EOS, and the evaluation's stop rule): the
    same tokens as plain greedy, and transformers' greedy choice at every generated
    position (one teacher-forced forward: a greedy sequence is its own argmax);
    chain-of-thought copies from the question, so many drafts are kept."""
    import torch
    import transformers

    from cca_jax.data import answers
    from cca_jax.data.prompt import encode
    from cca_jax.generate import stop_ids

    path, model, tok = smollm2
    questions = ["Ann has 12 apples and buys 5 bags with 3 apples each. How many apples does Ann have now?",
                 "A train travels 60 miles per hour for 3 hours. How far does the train travel?"]
    prompts = [encode(tok, q, 1) for q in questions]
    kw = dict(eos_token_id=stop_ids(model, tok), pad_token_id=tok.pad_token_id or 0)
    got = generate(model, prompts, 32, speculative="ngram", spec_k=4, **kw)
    st = speculative.last_stats()
    assert got == generate(model, prompts, 32, **kw)
    assert st.acceptance > 0.15 and st.tokens_per_step > 1.5
    stop = answers.stop_rule(tok)
    assert (generate(model, prompts, 32, stop=stop, speculative="ngram", spec_k=4, **kw)
            == generate(model, prompts, 32, stop=stop, **kw))
    ref = transformers.AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name,
                                                            dtype=torch.float32).eval()
    for p, g in zip(prompts, got):
        with torch.no_grad():
            logits = ref(torch.tensor([p + g])).logits[0, len(p) - 1:len(p) - 1 + len(g)]
        assert logits.argmax(-1).tolist() == g


# -- configuration ------------------------------------------------------------------------

def test_generate_rejects_bad_speculation_options(loaded):
    model = loaded["llama"]
    for kw, msg in ((dict(speculative="fast"), "speculative must be one of"),
                    (dict(speculative="ngram", spec_k=0), "spec_k must be an integer >= 1"),
                    (dict(speculative="ngram", spec_ngram=True), "spec_ngram must be an integer >= 1"),
                    (dict(speculative="model"), "needs a draft model")):
        with pytest.raises(CCAError, match=msg):
            generate(model, [[3, 4]], 4, **kw)


def test_generation_settings_in_run_configs(tmp_path):
    cfg = runconfig.load(tiny.CONFIG, ["generation.speculative=ngram", "generation.k=6"])
    assert (cfg.generation.speculative, cfg.generation.k, cfg.generation.ngram) == ("ngram", 6, 3)
    assert cfg.generation.options() == {"speculative": "ngram", "spec_k": 6, "spec_ngram": 3}
    # auto: off on this CPU (compute-bound decode), ngram on an accelerator
    assert runconfig.load(tiny.CONFIG).generation.options()["speculative"] == (
        "off" if jax.default_backend() == "cpu" else "ngram")
    for override, msg in (("generation.speculative=fast", "generation.speculative must be one of auto, off"),
                          ("generation.k=0", "generation.k must be >= 1"),
                          ("generation.k=17", "generation.k must be <= 16"),
                          ("generation.ngram=2.5", "generation.ngram must be an integer"),
                          ("generation.speculative=model", "generation.speculative: model needs generation.draft"),
                          ("generation.drafts=x", "unknown key")):
        with pytest.raises(CCAError, match=msg):
            runconfig.load(tiny.CONFIG, [override])


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
    assert cli.main(base + argv) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("cca-jax: error: ") and msg in err and "Traceback" not in err
    assert not out.exists()


def test_cli_eval_passes_generation_options(smollm2, tmp_path, monkeypatch):
    """``cca-jax eval --speculative ngram --spec-k 5`` generates speculatively."""
    from cca_jax import generate as gen

    seen = []
    real = gen.generate_with

    def spy(model, prompts, config, **kw):
        seen.append(config)
        return real(model, prompts, config, **kw)

    monkeypatch.setattr(gen, "generate_with", spy)
    monkeypatch.setattr(cca_jax, "load_model", lambda *a, **k: smollm2[1:])  # loaded once for the module
    assert cli.main(["eval", "--model", str(smollm2[0]), "--limit", "1", "--shots", "0", "--max-new-tokens", "4",
                     "--speculative", "ngram", "--spec-k", "5", "--out", str(tmp_path / "e")]) == 0
    assert [(c.speculative, c.spec_k, c.spec_ngram) for c in seen] == [("ngram", 5, 3)]
    assert (tmp_path / "e" / "items.jsonl").exists()
