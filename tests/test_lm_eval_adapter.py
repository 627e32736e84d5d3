"""The lm-evaluation-harness adapter (issue 23): lm-eval's own MMLU and TruthfulQA task
definitions, pointed at local files (no hub), run on a cca_jax model and give the
log-likelihoods of our bench-tasks scorer on the same items (so ``mmlu_5shot`` is the
harness's ``mmlu`` at 5 shots); generation and rolling log-likelihoods against direct
computations; the ``cca_jax`` model name through ``cca-jax lm-eval``."""

import csv
import json
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest

lm_eval = pytest.importorskip("lm_eval")
from lm_eval.api.instance import Instance  # noqa: E402
from lm_eval.tasks import TaskManager  # noqa: E402

import cca_jax  # noqa: E402
from cca_jax import cli, lm_eval_adapter  # noqa: E402
from cca_jax.char_tokenizer import char_tokenizer  # noqa: E402
from cca_jax.errors import CCAError  # noqa: E402
from cca_jax.evaluate import tasks  # noqa: E402

TINY = Path(__file__).parent.parent / "configs" / "models" / "tiny-llama.yaml"
LM_EVAL_TASKS = Path(lm_eval.__file__).parent / "tasks"
SUBJECTS = ("alpha", "beta")


@pytest.fixture(scope="module")
def tiny():
    model, _ = cca_jax.load_model(TINY)
    return model, char_tokenizer(model.config.vocab_size)


@pytest.fixture(scope="module")
def local(tmp_path_factory):
    """Local data in the hub's row format plus task YAMLs that include lm-eval's own
    definitions (mmlu's template, truthfulqa_mc1/mc2) and only swap the data source."""
    root = tmp_path_factory.mktemp("lm_eval_local")
    rng = np.random.default_rng(0)
    mmlu_rows = {}
    for s in SUBJECTS:
        for split, n in (("dev", 5), ("test", 3)):
            mmlu_rows[s, split] = [{"question": f" {s} {split} q{i}: {int(rng.integers(10, 99))} + 1? ",
                                    "choices": [str(int(x)) for x in rng.integers(10, 99, 4)],
                                    "answer": int(rng.integers(0, 4)), "index": i} for i in range(n)]
            (root / f"{s}_{split}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in mmlu_rows[s, split]))
            d = root / "eval" / "mmlu" / split  # the same items laid out for bench-tasks
            d.mkdir(parents=True, exist_ok=True)
            with open(d / f"{s}_{split}.csv", "w", newline="") as f:
                csv.writer(f).writerows([[r["question"], *r["choices"], "ABCD"[r["answer"]]]
                                         for r in mmlu_rows[s, split]])
        (root / "tasks").mkdir(exist_ok=True)
        (root / "tasks" / f"mmlu_{s}.yaml").write_text(
            f"include: {LM_EVAL_TASKS / 'mmlu' / 'default' / '_default_template_yaml'}\n"
            f"task: local_mmlu_{s}\ndataset_path: json\ndataset_name: null\n"
            f"dataset_kwargs:\n  data_files:\n    test: {root / f'{s}_test.jsonl'}\n    dev: {root / f'{s}_dev.jsonl'}\n"
            f"  cache_dir: {root / 'hf_cache'}\n"
            f"description: \"The following are multiple choice questions (with answers) about {s}.\\n\\n\"\n"
            f"num_fewshot: 5\n")
    tqa = [("What is 2+2?", ["4", "5", "22"], [1, 0, 0]), ("Which colour is the sky?", ["Blue.", "Green."], [1, 0]),
           ("Can pigs fly?", ["No.", "Yes, always.", "Only on Tuesdays."], [1, 0, 0])]
    rows = [{"question": q, "mc1_targets": {"choices": c, "labels": lab},
             "mc2_targets": {"choices": c, "labels": lab}} for q, c, lab in tqa]
    (root / "tqa.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    (root / "eval" / "truthfulqa").mkdir(parents=True)
    (root / "eval" / "truthfulqa" / "mc_task.json").write_text(json.dumps(
        [{"question": q, "mc1_targets": dict(zip(c, lab)), "mc2_targets": dict(zip(c, lab))} for q, c, lab in tqa]))
    for kind in ("mc1", "mc2"):
        (root / "tasks" / f"tqa_{kind}.yaml").write_text(
            f"include: {LM_EVAL_TASKS / 'truthfulqa' / f'truthfulqa_{kind}.yaml'}\n"
            f"task: local_truthfulqa_{kind}\ntag: []\ndataset_path: json\ndataset_name: null\n"
            f"dataset_kwargs:\n  data_files:\n    validation: {root / 'tqa.jsonl'}\n  cache_dir: {root / 'hf_cache'}\n")
    return root


def _evaluate(lm, root, names):
    tm = TaskManager(include_path=str(root / "tasks"), include_defaults=False)
    return lm_eval.simple_evaluate(model=lm, tasks=list(names), task_manager=tm, log_samples=True,
                                   bootstrap_iters=0, verbosity="ERROR")


def test_harness_mmlu_and_truthfulqa_equal_the_bench_tasks_scorer(tiny, local):
    model, tok = tiny
    lm = lm_eval_adapter.CCAJaxLM(model=model, tokenizer=tok, batch_size=4)
    res = _evaluate(lm, local, [f"local_mmlu_{s}" for s in SUBJECTS] + ["local_truthfulqa_mc1", "local_truthfulqa_mc2"])

    data = tasks.prepare("mmlu_5shot,truthfulqa_mc1,truthfulqa_mc2", data_dir=local / "eval")
    ours = tasks.run_tasks(model, tok, data["tasks"], data=data, batch_size=4, progress=False)
    want = {(r["subject"], r["index"]): r["lls"] for r in ours["mmlu_5shot"]["records"]}
    got = {}
    for s in SUBJECTS:
        for sample in res["samples"][f"local_mmlu_{s}"]:
            got[s, sample["doc"]["index"]] = [float(r[0][0]) for r in sample["resps"]]
    assert set(got) == set(want) and len(got) == 6
    for key in want:  # the harness's mmlu at 5 shots builds the same requests as mmlu_5shot
        np.testing.assert_allclose(got[key], want[key], atol=1e-5, rtol=1e-6, err_msg=str(key))
    assert res["results"][f"local_mmlu_{SUBJECTS[0]}"]["acc,none"] == pytest.approx(
        np.mean([r["correct"] for r in ours["mmlu_5shot"]["records"] if r["subject"] == SUBJECTS[0]]))

    for kind in ("mc1", "mc2"):
        samples = sorted(res["samples"][f"local_truthfulqa_{kind}"], key=lambda x: x["doc_id"])
        for sample, rec in zip(samples, ours[f"truthfulqa_{kind}"]["records"]):
            assert sample["doc"]["question"] == rec["question"]
            np.testing.assert_allclose([float(r[0][0]) for r in sample["resps"]], rec["lls"], atol=1e-5, rtol=1e-6)
        assert res["results"][f"local_truthfulqa_{kind}"]["acc,none"] == pytest.approx(
            ours[f"truthfulqa_{kind}"]["score"], abs=1e-6)


def test_generate_until_equals_the_triviaqa_generator(tiny):
    model, tok = tiny
    shots = [tasks.TriviaQAItem(i, f"What is {i} + 1?", str(i + 1), (str(i + 1),)) for i in range(3)]
    items = [tasks.TriviaQAItem(10 + i, q, "x", ("x",)) for i, q in enumerate(["Who? ", "Where is it?", "When?"])]
    want = [r["prediction"] for r in tasks.eval_triviaqa(model, tok, items, shots, max_new_tokens=10, batch_size=4,
                                                         progress=False)["records"]]
    lm = lm_eval_adapter.CCAJaxLM(model=model, tokenizer=tok, batch_size=4)
    reqs = [Instance("generate_until", {}, (tasks.triviaqa_prompt(it.question, shots),
                                            {"until": ["\n"], "max_gen_toks": 10}), i) for i, it in enumerate(items)]
    reqs.append(Instance("generate_until", {}, ("Q: 1+1?", {"until": ["."], "max_gen_toks": 6}), 3))
    got = lm.generate_until(reqs)
    assert [g.strip() for g in got[:3]] == want
    assert all("\n" not in g for g in got[:3]) and "." not in got[3]
    assert len(tok(got[3])["input_ids"]) <= 6


def test_rolling_loglikelihood_is_the_sum_over_the_text(tiny):
    model, tok = tiny
    text = "Ann has 3 pens and gets 4 more pens."
    ids = tok(text, add_special_tokens=False)["input_ids"]
    full = jnp.asarray([[tok.eos_token_id, *ids]])  # no BOS: the text is scored after EOS
    logp = jax.nn.log_softmax(model(full).logits[0].astype(jnp.float32), axis=-1)
    want = float(sum(logp[j, t] for j, t in enumerate(ids)))
    lm = lm_eval_adapter.CCAJaxLM(model=model, tokenizer=tok, batch_size=4)
    got = lm.loglikelihood_rolling([Instance("loglikelihood_rolling", {}, (text,), 0),
                                    Instance("loglikelihood_rolling", {}, ("",), 1)])
    assert got[0] == pytest.approx(want, abs=1e-4) and got[1] == 0.0
    # a context window shorter than the text: every token is still scored exactly once
    short = lm_eval_adapter.CCAJaxLM(model=model, tokenizer=tok, batch_size=4, max_length=12)
    windowed = short.loglikelihood_rolling([Instance("loglikelihood_rolling", {}, (text,), 0)])[0]
    assert windowed != pytest.approx(want, abs=1e-4) and np.isfinite(windowed)


def test_group_by_prefix():
    shots = list(range(100, 140))
    contexts = [shots + [1, 2], [7, 8, 9], shots + [3], [5] * 30 + [1], shots + [4, 4, 4], [7, 8, 1]]
    groups = lm_eval_adapter.group_by_prefix(contexts)
    assert groups[0] == (40, [0, 2, 4])  # the shared few-shot context, once
    assert groups[-1] == (0, [1, 3, 5])  # no long shared prefix: scored without one
    assert sorted(i for _, idx in groups for i in idx) == list(range(len(contexts)))


def test_bad_model_args(tiny):
    with pytest.raises(CCAError, match="unknown nonsense"):
        lm_eval_adapter.CCAJaxLM.create_from_arg_string(f"pretrained={TINY},tokenizer=char,nonsense=1")
    with pytest.raises(CCAError, match="give pretrained=MODEL and/or run_dir"):
        lm_eval_adapter.CCAJaxLM()
    with pytest.raises(CCAError, match="no tokenizer"):
        lm_eval_adapter.CCAJaxLM(pretrained=str(TINY))
    with pytest.raises(CCAError, match="batch_size must be >= 1"):
        lm_eval_adapter.CCAJaxLM(pretrained=str(TINY), tokenizer="char", batch_size="0")


def test_registered_under_its_name_and_declared_as_an_entry_point():
    from lm_eval.api.registry import get_model

    assert get_model("cca_jax") is lm_eval_adapter.CCAJaxLM
    # lm-eval's plugin discovery (after 0.4.13) reads this group; the wheel test checks that
    # the built wheel carries it
    text = (Path(__file__).parent.parent / "pyproject.toml").read_text()
    assert '[project.entry-points."lm_eval.models"]\ncca_jax = "cca_jax.lm_eval_adapter:CCAJaxLM"' in text


def test_cli_runs_the_harness_with_the_cca_jax_model(local, capsys):
    out = local / "cli_out"
    rc = cli.main(["lm-eval", "--model", "cca_jax", "--model_args", f"pretrained={TINY},tokenizer=char",
                   "--tasks", "local_truthfulqa_mc1", "--include_path", str(local / "tasks"), "--batch_size", "4",
                   "--output_path", str(out)])
    assert rc == 0
    printed = capsys.readouterr().out
    assert "local_truthfulqa_mc1" in printed and "cca_jax" in printed
    results = list(out.rglob("results_*.json"))
    assert results and "local_truthfulqa_mc1" in json.loads(results[0].read_text())["results"]


def test_cli_without_the_harness_is_one_line(monkeypatch, capsys):
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda n, *a: None if n == "lm_eval" else real(n, *a))
    assert cli.main(["lm-eval", "--model", "cca_jax", "--tasks", "x"]) == 2
    err = capsys.readouterr().err
    assert err == "cca-jax: error: lm-evaluation-harness is not installed: pip install 'cca-jax[lmeval]'\n"
