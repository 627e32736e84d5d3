"""`cca-jax export RUN_DIR OUT` (issue 23): a finished run's trained model (CCA, full and
LoRA fine-tuning) as a Hugging Face directory with config, generation_config.json,
tokenizer and weights; the same weights the pipeline's own export writes; transformers
reloads it with our logits. Plus the writer's generation config and chat template."""

import dataclasses
import json
import shutil
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import transformers
from flax import nnx
from safetensors.numpy import load_file

import cca_jax
from cca_jax import cli, pipeline, runconfig, runs
from cca_jax.char_tokenizer import char_tokenizer
from cca_jax.errors import CCAError
from cca_jax.evaluate import gsm

CONFIG = Path(__file__).parent.parent / "configs" / "tiny.yaml"
SHORT = {"cca": ["dcm.epochs=2", "amplify.steps=2", "amplify.eval_steps=[1,2]"],
         "sft_full": ["method=sft_full", "sft.steps=2", "sft.eval_steps=[1,2]"],
         "sft_lora": ["method=sft_lora", "sft.steps=2", "sft.eval_steps=[1,2]"]}
_RUNS = {}


def _best_is_step_1(monkeypatch):
    """Val accuracy 1.0 after step 1 (the tiny random model never answers right), so the
    exported weights are trained ones, neither the base model nor the last step's."""
    real = gsm.evaluate

    def fake(*a, desc="eval", **kw):
        acc, recs = real(*a, desc=desc, **kw)
        return (dataclasses.replace(acc, overall=1.0) if desc == "val step 1" else acc), recs

    monkeypatch.setattr(gsm, "evaluate", fake)


@pytest.fixture(scope="module")
def run_of(tmp_path_factory):
    """method -> run directory of a finished tiny run whose best step is 1 (the base
    evaluation is computed once and copied)."""

    def get(method):
        if method not in _RUNS:
            d = tmp_path_factory.mktemp(f"run_{method}")
            if _RUNS:
                shutil.copytree(next(iter(_RUNS.values())) / "stages" / "base_eval", d / "stages" / "base_eval")
            with pytest.MonkeyPatch.context() as mp:
                _best_is_step_1(mp)
                s = pipeline.run(runconfig.load(CONFIG, SHORT[method]), d, progress=False, log=lambda m: None)
            assert s["best_step"] == 1
            _RUNS[method] = d
        return _RUNS[method]

    yield get
    _RUNS.clear()


def _tensors(d: Path) -> dict:
    return load_file(str(d / "model.safetensors"))


@pytest.mark.parametrize("method", ["cca", "sft_full", "sft_lora"])
def test_export_of_a_run_dir_reloads_with_our_logits(run_of, tmp_path, method, capsys):
    run = run_of(method)
    out = tmp_path / "exported"
    assert cli.main(["export", str(run), str(out)]) == 0
    assert f"the trained model of run {run}" in capsys.readouterr().out
    assert {"config.json", "generation_config.json", "model.safetensors", "tokenizer.json"} <= \
        {p.name for p in out.iterdir()}
    assert json.loads((out / "generation_config.json").read_text())["eos_token_id"] == 2  # the char tokenizer's

    # the pipeline's own export (export: true; every stage reused) writes the same weights
    cfg = runconfig.load(CONFIG, SHORT[method] + ["export=true"])
    with pytest.MonkeyPatch.context() as mp:
        _best_is_step_1(mp)
        pipeline.run(cfg, run, progress=False, log=lambda m: None)
    own = run / (pipeline.CCA_EXPORT_DIR if method == "cca" else pipeline.SFT_EXPORT_DIR)
    ours_t, own_t = _tensors(out), _tensors(own)
    assert set(ours_t) == set(own_t)
    for k in own_t:
        np.testing.assert_array_equal(ours_t[k], own_t[k], err_msg=k)

    # trained: the weights differ from the base model's
    base, _ = cca_jax.load_model(cfg.model)
    model = runs.trained_model(run)
    q = lambda m: np.asarray(m.params()["layers"]["attn"]["q"])
    assert not np.array_equal(q(model), q(base))

    # transformers: same tokenizer ids, same logits
    hf = transformers.AutoModelForCausalLM.from_pretrained(out).eval()
    hf_tok = transformers.AutoTokenizer.from_pretrained(out)
    text = "Ann has 3 pens and gets 4 more."
    ids = char_tokenizer(model.config.vocab_size)(text)["input_ids"]
    assert hf_tok(text)["input_ids"] == ids
    with torch.no_grad():
        ref = hf(torch.tensor([ids])).logits.numpy()
    np.testing.assert_allclose(np.asarray(model(jnp.asarray([ids])).logits), ref, atol=1e-4)


def test_trained_model_checks_its_inputs(run_of, tmp_path):
    run = run_of("cca")
    with pytest.raises(CCAError, match="not a finished run"):
        runs.trained_model(tmp_path / "nothing")
    base, _ = cca_jax.load_model(CONFIG.parent / "models" / "tiny-llama.yaml")
    small = cca_jax.Transformer(base.config.replace(intermediate_size=64), rngs=nnx.Rngs(0))
    with pytest.raises(CCAError, match="do not fit this model"):
        runs.trained_model(run, small)
    # a run killed before its first checkpoint: one line, nothing written
    half = tmp_path / "half"
    shutil.copytree(run, half)
    shutil.rmtree(half / "stages" / "amplify")
    (half / "stages" / "amplify").mkdir()
    with pytest.raises(CCAError, match="no trained weights .* not a finished run"):
        runs.export(half, tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_export_cli_bad_inputs_are_one_line(run_of, tmp_path, capsys):
    run = run_of("cca")
    taken = tmp_path / "taken"
    taken.mkdir()
    (taken / "notes.txt").write_text("mine")
    assert cli.main(["export", str(run), str(taken)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("cca-jax: error: refusing to export into") and err.count("\n") == 1
    assert "Traceback" not in err
    assert sorted(p.name for p in taken.iterdir()) == ["notes.txt"]
    broken = tmp_path / "broken"
    shutil.copytree(run, broken)
    (broken / "config.yaml").write_text("model: [unclosed\n")
    assert cli.main(["export", str(broken), str(tmp_path / "o2")]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"cca-jax: error: {broken / 'config.yaml'}") and err.count("\n") == 1
    assert not (tmp_path / "o2").exists()


def test_writer_keeps_the_chat_template_and_the_source_generation_config(tmp_path):
    model, _ = cca_jax.load_model(CONFIG.parent / "models" / "tiny-llama.yaml")
    tok = char_tokenizer(model.config.vocab_size)
    tok.chat_template = ("{% for m in messages %}<{{ m['role'] }}>{{ m['content'] }}\n{% endfor %}"
                         "{% if add_generation_prompt %}<assistant>{% endif %}")
    source = {"bos_token_id": 1, "eos_token_id": [2, 7], "pad_token_id": 0}
    out = cca_jax.export_hf(model, tmp_path / "with_template", tokenizer=tok, generation_config=source)
    again = transformers.AutoTokenizer.from_pretrained(out)
    msgs = [{"role": "user", "content": "2+2?"}]
    assert again.apply_chat_template(msgs, tokenize=False, add_generation_prompt=True) == "<user>2+2?\n<assistant>"
    gen = transformers.GenerationConfig.from_pretrained(out)
    assert gen.eos_token_id == [2, 7] and gen.bos_token_id == 1
    # and from the config alone (no source): the config's and tokenizer's ids
    plain = cca_jax.export_hf(model, tmp_path / "plain", tokenizer=tok)
    assert transformers.GenerationConfig.from_pretrained(plain).eos_token_id == tok.eos_token_id


def test_demo_amplified_model_is_the_runs_trained_model(run_of):
    from cca_jax import demo

    run = run_of("cca")
    model, _ = cca_jax.load_model(CONFIG.parent / "models" / "tiny-llama.yaml")
    a, b = demo.amplified_model(model, run).params(), runs.trained_model(run, model).params()
    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y))


def test_export_of_a_hf_directory_keeps_its_generation_config(hf_dirs, tmp_path, capsys):
    src = tmp_path / "src"
    shutil.copytree(hf_dirs["llama"][1], src)
    (src / "generation_config.json").write_text(json.dumps({"bos_token_id": 1, "eos_token_id": [2, 5],
                                                            "max_new_tokens": 7}))
    assert cli.main(["export", str(src), str(tmp_path / "out")]) == 0
    gen = transformers.GenerationConfig.from_pretrained(tmp_path / "out")
    assert gen.eos_token_id == [2, 5] and gen.max_new_tokens == 7


def test_lm_eval_model_of_a_run_dir_is_its_trained_model(run_of):
    pytest.importorskip("lm_eval")
    from lm_eval.api.instance import Instance

    from cca_jax import lm_eval_adapter

    run = run_of("cca")
    want = runs.trained_model(run).params()
    by_run = lm_eval_adapter.CCAJaxLM.create_from_arg_string(f"run_dir={run}", {"batch_size": 4})
    on_base = lm_eval_adapter.CCAJaxLM(pretrained=str(CONFIG.parent / "models" / "tiny-llama.yaml"),
                                       run_dir=str(run), tokenizer="char")
    for lm in (by_run, on_base):
        for x, y in zip(jax.tree.leaves(lm.model.params()), jax.tree.leaves(want)):
            np.testing.assert_array_equal(np.asarray(x), np.asarray(y))
    req = [Instance("loglikelihood", {}, ("Ann has 3 pens.", " 4"), 0)]
    base = lm_eval_adapter.CCAJaxLM(pretrained=str(CONFIG.parent / "models" / "tiny-llama.yaml"), tokenizer="char")
    assert by_run.loglikelihood(req)[0][0] != base.loglikelihood(req)[0][0]  # the amplified weights score
