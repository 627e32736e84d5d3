"""Side-effect benchmarks (`cca-jax bench-tasks`): log-likelihood scoring, metrics, data,
CLI; and SmolLM2 MMLU/TruthfulQA choice scores against a plain transformers computation."""

import functools
import json
import math
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import cca_jax
from cca_jax import cli
from tiny import smollm2_path
from cca_jax.char_tokenizer import char_tokenizer
from cca_jax.errors import CCAError
from cca_jax.evaluate import loglik, tasks

CONFIGS = Path(__file__).parent.parent / "configs" / "models"
SHARED_EVAL = Path("../shared/data/eval")


@pytest.fixture(scope="module")
def tiny():
    model, _ = cca_jax.load_model(CONFIGS / "tiny-llama.yaml")
    return model, char_tokenizer(model.config.vocab_size)


@functools.partial(jax.jit, static_argnames="cfg")
def _plain_logits(cfg, params, tokens):
    from cca_jax.model.transformer import forward

    return forward(cfg, params, tokens).logits


def _full_logits(model, seq):
    """Logits of one plain forward (no cache, no mask) over ``seq``, right-padded to a bucket
    length (few compiles): padding after the sequence cannot change its logits (causal)."""
    toks = np.zeros((1, max(96, loglik.bucket(len(seq)))), np.int32)
    toks[0, : len(seq)] = seq
    return np.asarray(_plain_logits(model.config, model.params(), jnp.asarray(toks))[0, : len(seq)])


def _direct(model, prefix, ctx, cont):
    """Log-probs of ``cont`` from one full forward over prefix + ctx + cont, no cache."""
    full = list(prefix) + list(ctx) + list(cont)
    lp = np.asarray(jax.nn.log_softmax(_full_logits(model, full), axis=-1))
    n = len(prefix) + len(ctx)
    return [float(lp[n - 1 + j, t]) for j, t in enumerate(cont)]


def test_cached_prefix_equals_uncached(tiny):
    model, _ = tiny
    rng = np.random.default_rng(1)
    prefix = [int(t) for t in rng.integers(3, 128, 21)]
    pairs = [([int(t) for t in rng.integers(3, 128, rng.integers(1, 14))],
              [int(t) for t in rng.integers(3, 128, rng.integers(1, 6))]) for _ in range(11)]
    pairs += [(pairs[0][0], [7]), (pairs[0][0], [9]), ([], [5, 6])]  # a shared row; an empty context
    cached, greedy = loglik.continuation_logprobs(model, prefix, pairs, batch_size=4, with_greedy=True)
    plain = loglik.continuation_logprobs(model, [], [(prefix + c, x) for c, x in pairs], batch_size=3)
    for (c, x), a, b, g in zip(pairs, cached, plain, greedy):
        want = _direct(model, prefix, c, x)
        assert len(a) == len(x) == len(b)
        np.testing.assert_allclose(a, want, atol=2e-5)
        np.testing.assert_allclose(b, want, atol=2e-5)
        logits = _full_logits(model, prefix + c + x)
        n = len(prefix) + len(c)
        assert g == all(logits[n - 1 + j].argmax() == t for j, t in enumerate(x))
    # the sums, with the shared prefix found automatically
    sums = loglik.loglikelihoods(model, [(prefix + c, x) for c, x in pairs], batch_size=8)
    np.testing.assert_allclose(sums, [sum(v) for v in cached], atol=5e-5)
    with pytest.raises(CCAError, match="at least one token"):
        loglik.continuation_logprobs(model, prefix, [([3], [])])


def test_bucket_sizes():
    sizes = [loglik.bucket(n) for n in range(1, 2000)]
    assert all(s >= n for n, s in zip(range(1, 2000), sizes))
    assert sorted(set(sizes)) == [16, 24, 32, 48, 64, 96, 128, 192, 256, 384, 512, 768, 1024, 1536, 2048]
    assert loglik.bucket(130, 128) == 192


def test_encode_pairs_splits_whole_text(tiny):
    _, tok = tiny
    pairs = loglik.encode_pairs(tok, ["Answer:", "Answer:"], [" A", " B"])
    assert pairs[0] == (tok("Answer:")["input_ids"], tok(" A")["input_ids"])
    assert pairs[1][1] == tok(" B")["input_ids"]


def test_mc1_mc2_on_handmade_logprobs():
    lls = list(np.log([0.5, 0.2, 0.3]))
    assert tasks.mc2_score(lls, [1, 0, 1]) == pytest.approx(0.8)
    assert tasks.mc2_score([x - 1000 for x in lls], [1, 0, 1]) == pytest.approx(0.8)  # stable, scale-free
    assert tasks.mc2_score(list(np.log([0.1, 0.1, 0.2])), [0, 1, 0]) == pytest.approx(0.25)
    assert tasks.mc1_correct([-1.0, -0.5, -3.0], [1, 0, 0]) is False
    assert tasks.mc1_correct([-0.4, -0.5, -3.0], [1, 0, 0]) is True
    assert tasks.mc1_correct([-0.5, -0.5], [1, 0]) is True  # ties: the first


def test_triviaqa_normalization_and_aliases(tiny):
    assert tasks.normalize_answer("  The Beatles!! ") == "beatles"
    assert tasks.normalize_answer("A Tale of Two Cities.") == "tale of two cities"
    assert tasks.normalize_answer("an apple, the pear") == "apple pear"
    assert tasks.exact_match("the Onion.", ["Allium cepa", "Onion"])
    assert not tasks.exact_match("onions", ["Onion"])
    assert not tasks.exact_match("", ["Onion"])
    assert tasks.exact_match("Dr. No", ["dr no"])
    _, tok = tiny
    rule = tasks.newline_stop(tok)
    ids = tok(" Paris\nQuestion")["input_ids"]
    assert rule(ids[:3]) is None and rule(ids) == 7  # through the newline


def _write_data(root: Path, n_tqa=5, n_trivia=9, n_gsm=4):
    """A small data directory laid out like ../shared/data/eval."""
    import csv

    for split, counts in (("test", {"alpha": 2, "beta_gamma": 1, "delta": 3}), ("dev", {"alpha": 5, "beta_gamma": 5,
                                                                                      "delta": 5})):
        d = root / "mmlu" / split
        d.mkdir(parents=True)
        for subject, n in counts.items():
            with open(d / f"{subject}_{split}.csv", "w", newline="") as f:
                w = csv.writer(f)
                for i in range(n):
                    w.writerow([f"{subject} {split} q{i}, with a comma?", "1", "2", "3", "4", "ABCD"[i % 4]])
    (root / "truthfulqa").mkdir()
    rows = [{"question": f"Is {i} odd?", "mc1_targets": {f"Yes {i}.": 1, "No.": 0, "Maybe.": 0},
             "mc2_targets": {f"Yes {i}.": 1, "Sure.": 1, "No.": 0}} for i in range(n_tqa)]
    (root / "truthfulqa" / "mc_task.json").write_text(json.dumps(rows))
    (root / "triviaqa").mkdir()
    (root / "triviaqa" / "triviaqa_sm_sub.jsonl").write_text("".join(
        json.dumps({"context": f"Question: What is {i} + 1?\nAnswer:", "answer": str(i + 1),
                    "aliases": [str(i + 1), f"n{i + 1}"]}) + "\n" for i in range(n_trivia)))
    (root / "gsm8k").mkdir()
    (root / "gsm8k" / "test.jsonl").write_text("".join(
        json.dumps({"question": f"What is {i} times 2?", "answer": f"{i} * 2 = {2 * i}\n#### {2 * i:,}"}) + "\n"
        for i in range(1000, 1000 + n_gsm)))
    return root


@pytest.fixture()
def data_dir(tmp_path):
    return _write_data(tmp_path / "eval")


def test_limit_subsets_are_deterministic(data_dir):
    d = tasks.prepare("mmlu_5shot,truthfulqa_mc2,triviaqa_5shot,gsm8k_cot_8shot", limit=4, data_dir=data_dir)
    items, dev = d["mmlu"]
    assert [(it.subject, it.index) for it in items] == [("alpha", 0), ("beta_gamma", 0), ("delta", 0), ("alpha", 1)]
    assert items[0].question == "alpha test q0, with a comma?" and items[0].choices == ("1", "2", "3", "4")
    assert len(dev["delta"]) == 5
    assert [it.index for it in d["truthfulqa"]] == [0, 1, 2, 3]
    trivia, shots = d["triviaqa"]
    assert [it.index for it in shots] == [0, 1, 2, 3, 4] and [it.index for it in trivia] == [5, 6, 7, 8]
    assert trivia[0].question == "What is 5 + 1?" and trivia[0].aliases == ("6", "n6")
    assert [it.gold for it in d["gsm8k"]] == [2000.0, 2002.0, 2004.0, 2006.0]
    again = tasks.prepare("mmlu_5shot,truthfulqa_mc2,triviaqa_5shot,gsm8k_cot_8shot", limit=4, data_dir=data_dir)
    assert again == d
    full = tasks.prepare("mmlu_5shot", data_dir=data_dir)
    assert len(full["mmlu"][0]) == 6
    assert len(tasks.prepare("mmlu_5shot", limit=100, data_dir=data_dir)["mmlu"][0]) == 6
    for bad in (0, -2, True):
        with pytest.raises(CCAError, match="--limit must be a positive integer"):
            tasks.prepare("mmlu_5shot", limit=bad, data_dir=data_dir)
    with pytest.raises(CCAError, match="unknown task 'mmlux'"):
        tasks.prepare("mmlu_5shot,mmlux", data_dir=data_dir)
    (data_dir / "gsm8k" / "test.jsonl").unlink()
    with pytest.raises(CCAError, match="test.jsonl: missing \\(needed by gsm8k\\)"):
        tasks.prepare("gsm8k_cot_8shot", data_dir=data_dir)


def test_data_dir_resolution(tmp_path, monkeypatch):
    monkeypatch.delenv(tasks.ENV_DATA, raising=False)
    repo = tmp_path / "work" / "repo"
    repo.mkdir(parents=True)
    monkeypatch.chdir(repo)
    with pytest.raises(CCAError, match="no evaluation data: pass --data-dir"):
        tasks.resolve_data_dir()
    default = tmp_path / "work" / "shared" / "data" / "eval"
    default.mkdir(parents=True)
    assert tasks.resolve_data_dir() == default.resolve()
    other = tmp_path / "other"
    other.mkdir()
    monkeypatch.setenv(tasks.ENV_DATA, str(other))
    assert tasks.resolve_data_dir() == other
    assert tasks.resolve_data_dir(default) == default  # --data-dir wins
    with pytest.raises(CCAError, match="--data-dir /no/such: no such directory"):
        tasks.resolve_data_dir("/no/such")


def test_prompts():
    it = tasks.MMLUItem("high_school_biology", 0, "Q?", ("w", "x", "y", "z"), "C")
    shot = tasks.MMLUItem("high_school_biology", 0, "S?", ("1", "2", "3", "4"), "B")
    assert tasks.mmlu_prompt(it, [shot]) == (
        "The following are multiple choice questions (with answers) about high school biology.\n\n"
        "S?\nA. 1\nB. 2\nC. 3\nD. 4\nAnswer: B\n\nQ?\nA. w\nB. x\nC. y\nD. z\nAnswer:")
    p = tasks.truthfulqa_prompt("Why?")
    assert p.count("Q: ") == 7 and p.count("\nA: ") == 6 and p.endswith("\n\nQ: Why?\nA:")
    assert p.startswith("Q: What is human life expectancy in the United States?\nA: Human life")
    shots = [tasks.TriviaQAItem(0, "One?", "1", ("1",))]
    assert tasks.triviaqa_prompt("Two?", shots) == "Question: One?\nAnswer: 1\n\nQuestion: Two?\nAnswer:"


def test_run_tasks_records_are_consistent(tiny, data_dir):
    model, tok = tiny
    res = tasks.run_tasks(model, tok, "mmlu_5shot,truthfulqa_mc1,truthfulqa_mc2", data_dir=data_dir, progress=False,
                          batch_size=4)
    assert list(res) == ["mmlu_5shot", "truthfulqa_mc1", "truthfulqa_mc2"]
    m = res["mmlu_5shot"]
    assert m["n"] == 6 and m["per_subject"]["delta"]["n"] == 3
    for r in m["records"]:
        assert r["correct"] == ("ABCD"[int(np.argmax(r["lls"]))] == r["gold"])
    assert m["score"] == pytest.approx(np.mean([r["correct"] for r in m["records"]]))
    # one MMLU item scored directly (no cache, no batching)
    items, dev = tasks.prepare("mmlu_5shot", data_dir=data_dir)["mmlu"]
    r0 = next(r for r in m["records"] if (r["subject"], r["index"]) == ("delta", 2))
    ctx = tok(tasks.mmlu_prompt(items[-1], dev["delta"]))["input_ids"]
    want = [sum(_direct(model, [], ctx, tok(f" {k}")["input_ids"])) for k in "ABCD"]  # " A" is 2 chars
    np.testing.assert_allclose(r0["lls"], want, atol=2e-5)
    mc1, mc2 = res["truthfulqa_mc1"], res["truthfulqa_mc2"]
    assert mc1["n"] == mc2["n"] == 5
    for r1, r2 in zip(mc1["records"], mc2["records"]):
        assert r1["choices"][1:] == ["No.", "Maybe."] and r2["choices"][1:] == ["Sure.", "No."]
        assert r1["lls"][0] == r2["lls"][0] and r1["lls"][1] == r2["lls"][2]  # shared scores
        assert r2["score"] == pytest.approx(tasks.mc2_score(r2["lls"], [1, 1, 0]))
        assert 0 <= r2["score"] <= 1


def test_cli_writes_json(tiny, data_dir, tmp_path, capsys):
    out = tmp_path / "res" / "bt.json"
    code = cli.main(["bench-tasks", "--model", str(CONFIGS / "tiny-llama.yaml"), "--tokenizer", "char",
                     "--tasks", "mmlu_5shot,truthfulqa_mc1,truthfulqa_mc2,triviaqa_5shot,gsm8k_cot_8shot", "--limit", "2",
                     "--data-dir", str(data_dir), "--max-new-tokens", "6", "--batch-size", "4", "--quiet",
                     "--out", str(out)])
    assert code == 0
    res = json.loads(out.read_text())
    assert list(res["tasks"]) == list(tasks.TASKS) and res["limit"] == 2
    for name, r in res["tasks"].items():
        assert r["n"] == 2 and len(r["records"]) == 2, name
        assert 0 <= r["score"] <= 1 and {"metric", "seconds"} <= set(r)
    assert res["tasks"]["triviaqa_5shot"]["records"][0]["index"] == 5
    assert all(r["n_generated"] <= 6 for r in res["tasks"]["gsm8k_cot_8shot"]["records"])
    assert [p.name for p in out.parent.iterdir()] == ["bt.json"]  # atomic: no temp file left
    printed = capsys.readouterr().out
    assert "mmlu_5shot: acc" in printed and "wrote" in printed


def test_cli_errors_are_one_line(data_dir, tmp_path, capsys, monkeypatch):
    model = str(CONFIGS / "tiny-llama.yaml")
    out = str(tmp_path / "x.json")
    assert cli.main(["bench-tasks", "--model", model, "--tasks", "mmlu_5shot,gpqa", "--data-dir", str(data_dir),
                     "--out", out]) == 2
    err = capsys.readouterr().err
    assert "unknown task 'gpqa'" in err and err.count("\n") == 1
    assert cli.main(["bench-tasks", "--model", model, "--tasks", "mmlu_5shot", "--data-dir", "/no/such/dir",
                     "--out", out]) == 2
    err = capsys.readouterr().err
    assert "/no/such/dir: no such directory" in err and err.count("\n") == 1
    monkeypatch.delenv(tasks.ENV_DATA, raising=False)
    monkeypatch.chdir(tmp_path)
    assert cli.main(["bench-tasks", "--model", model, "--tasks", "mmlu_5shot", "--out", out]) == 2
    err = capsys.readouterr().err
    assert "no evaluation data" in err and err.count("\n") == 1
    assert cli.main(["bench-tasks", "--model", model, "--limit", "0", "--data-dir", str(data_dir),
                     "--out", out]) == 2
    assert "--limit must be a positive integer" in capsys.readouterr().err
    assert cli.main(["bench-tasks", "--model", model, "--tasks", "mmlu_5shot", "--data-dir", str(data_dir),
                     "--out", out]) == 2  # a random YAML model has no tokenizer
    assert "--tokenizer char" in capsys.readouterr().err
    assert not Path(out).exists()


# -- SmolLM2 against transformers ---------------------------------------------------------

@pytest.fixture(scope="module")
def smollm2():
    import torch
    import transformers

    path = smollm2_path()
    if not SHARED_EVAL.is_dir():
        pytest.skip(f"no evaluation data at {SHARED_EVAL.resolve()} (run from the repo root next to ../shared)")
    ours, tok = cca_jax.load_model(path)
    ref = transformers.AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name,
                                                            dtype=torch.float32).eval()
    ref_tok = transformers.AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name)
    return ours, tok, ref, ref_tok


def _hf_lls(ref, ref_tok, context: str, continuations: list[str]) -> list[float]:
    """Sum of continuation log-probs from a plain transformers forward over context +
    continuation, no cache. The last token is never an input, so each row is context +
    continuation[:-1] (MMLU's four rows are then one); rows run as one right-padded batch and
    the lm head is applied only where a continuation token is predicted."""
    import torch

    ctx = ref_tok(context)["input_ids"]
    rows, spans = {}, []
    for x in continuations:
        whole = ref_tok(context + x)["input_ids"]
        assert whole[: len(ctx)] == ctx and len(whole) > len(ctx)
        spans.append((rows.setdefault(tuple(whole[:-1]), len(rows)), len(ctx), whole[len(ctx):]))
    T = max(len(r) for r in rows)
    ids = torch.zeros((len(rows), T), dtype=torch.long)
    att = torch.zeros((len(rows), T), dtype=torch.long)
    for i, r in enumerate(rows):
        ids[i, : len(r)], att[i, : len(r)] = torch.tensor(r), 1
    with torch.inference_mode():
        hidden = ref.model(input_ids=ids, attention_mask=att).last_hidden_state
        out = []
        for i, n, cont in spans:
            pos = torch.arange(n - 1, n - 1 + len(cont))
            lp = torch.log_softmax(ref.lm_head(hidden[i, pos]).double(), dim=-1)
            out.append(float(lp[torch.arange(len(cont)), torch.tensor(cont)].sum()))
    return out


def test_smollm2_choice_loglikelihoods_match_transformers(smollm2):
    ours, tok, ref, ref_tok = smollm2
    data = tasks.prepare("mmlu_5shot,truthfulqa_mc1,truthfulqa_mc2", data_dir=SHARED_EVAL)
    items, dev = data["mmlu"]
    # two subjects with short prompts, 10 items each (one cached 5-shot prefix per subject)
    mmlu_items = [it for s in ("abstract_algebra", "world_religions") for it in
                  [x for x in items if x.subject == s][:10]]
    assert len(mmlu_items) == 20
    got = tasks.eval_mmlu(ours, tok, mmlu_items, dev, progress=False)
    diffs = {"mmlu": 0.0, "mc1": 0.0, "mc2": 0.0}
    for it, r in zip(mmlu_items, got["records"]):
        prompt = tasks.mmlu_prompt(it, dev[it.subject][:5])
        assert tok(prompt)["input_ids"] == ref_tok(prompt)["input_ids"]
        want = _hf_lls(ref, ref_tok, prompt, [f" {k}" for k in tasks.LETTERS])
        diffs["mmlu"] = max(diffs["mmlu"], float(np.abs(np.subtract(r["lls"], want)).max()))
        assert r["pred"] == tasks.LETTERS[int(np.argmax(want))], (it.subject, it.index)

    # the 20 questions with the fewest choices (the reference runs every choice in full)
    tqa = sorted(data["truthfulqa"], key=lambda it: (len({c for c, _ in it.mc1 + it.mc2}), it.index))[:20]
    res = tasks.eval_truthfulqa(ours, tok, tqa, progress=False)
    ref_lls = []  # per question: choice -> transformers log-likelihood (MC1 and MC2 choices)
    for it in tqa:
        prompt = tasks.truthfulqa_prompt(it.question)
        assert tok(prompt)["input_ids"] == ref_tok(prompt)["input_ids"]
        choices = list(dict.fromkeys(c for c, _ in it.mc1 + it.mc2))
        ref_lls.append(dict(zip(choices, _hf_lls(ref, ref_tok, prompt, [f" {c}" for c in choices]))))
    for kind in ("mc1", "mc2"):
        for it, r, ll in zip(tqa, res[f"truthfulqa_{kind}"]["records"], ref_lls):
            assert r["choices"] == [c for c, _ in getattr(it, kind)] and len(r["choices"]) >= 2
            want = [ll[c] for c in r["choices"]]
            diffs[kind] = max(diffs[kind], float(np.abs(np.subtract(r["lls"], want)).max()))
            assert int(np.argmax(r["lls"])) == int(np.argmax(want)), (kind, it.index)
            if kind == "mc2":
                assert r["score"] == pytest.approx(tasks.mc2_score(want, r["labels"]), abs=1e-3)
    print(f"max abs log-likelihood diff vs transformers: {diffs}")
    assert max(diffs.values()) <= 1e-3, diffs
    assert all(math.isfinite(v) for v in diffs.values())
