"""SFT baselines (SPEC 5): answer-only loss, prompt identity with evaluation, full and LoRA
training, LoRA merge against an un-merged reference, and the pipeline (summary, resume,
export)."""

import dataclasses
import json
import shutil
import types
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import cca_jax
from cca_jax import cli, pipeline, runconfig, stages
from cca_jax.baselines import lora, sft
from cca_jax.char_tokenizer import char_tokenizer
from cca_jax.data import answers, gsm_symbolic, prompt
from cca_jax.errors import CCAError
from cca_jax.evaluate import gsm

CONFIG = Path(__file__).parent.parent / "configs" / "tiny.yaml"


class Killed(Exception):
    pass


@pytest.fixture(scope="module")
def tiny():
    cfg = runconfig.load(CONFIG)
    model, _ = cca_jax.load_model(cfg.model)
    return model, char_tokenizer(model.config.vocab_size)


def _items(n=6):
    """Builtin items in ASCII (the char tokenizer has no other characters)."""
    items = [it for it in gsm_symbolic.load_items("builtin", 2, 0) if (it.question + it.answer_text).isascii()]
    return items[:n]


# -- data ---------------------------------------------------------------------------------------

def test_answer_text_is_a_cot_the_extractor_reads():
    items = gsm_symbolic.load_items("builtin", 3, 0) + gsm_symbolic.toy_digits(3, 0)
    for it in items:
        text = sft.answer_text(it)
        assert text.endswith(f"The final answer is {int(it.answer)}.")
        assert "<<" not in text and "####" not in text and "\n" not in text
        for mode in answers.MODES:
            assert answers.is_correct(answers.extract(" " + text, mode), it.answer), (mode, text)
    solved = items[0]
    assert len(sft.answer_text(solved)) > len("The final answer is 89.") + 20  # the solution is used
    bare = gsm_symbolic.Item(1, 0, "q?", 3.5, "")
    assert sft.answer_text(bare) == "The final answer is 3.5."


@pytest.mark.parametrize("chat", [False, True])
def test_prompt_tokens_equal_the_evaluation_encoding(tiny, chat):
    model, tok = tiny
    if chat:
        tok = char_tokenizer(model.config.vocab_size)
        tok.chat_template = ("{% for m in messages %}<{{ m['role'] }}>{{ m['content'] }}\n{% endfor %}"
                             "{% if add_generation_prompt %}<assistant>{% endif %}")
    items = _items()
    exs = sft.build_examples(tok, items, n_shots=2, chat_template=chat)
    T, P = sft.shapes(exs)
    b = sft.collate(exs, T, P, pad=0)
    for i, (it, e) in enumerate(zip(items, exs)):
        want = prompt.encode(tok, it.question, 2, chat)
        assert list(e.prompt) == want
        np.testing.assert_array_equal(b.tokens[i, :len(want)], want)
        assert e.answer[-1] == tok.eos_token_id
        text = tok.decode(list(e.answer), skip_special_tokens=True)
        assert text.strip() == sft.answer_text(it)
        assert text.startswith(" ") != chat  # the plain prompt's line continues; a chat turn starts fresh
        # weights mark exactly the positions that predict answer tokens
        w = np.flatnonzero(b.weights[i])
        np.testing.assert_array_equal(w, np.arange(len(want) - 1, len(e.tokens) - 1))
        np.testing.assert_array_equal(b.labels[i, w], e.answer)
        np.testing.assert_array_equal(b.at[i, b.at_valid[i]], w)
        assert not b.mask[i, len(e.tokens):].any() and b.mask[i, :len(e.tokens)].all()


def test_batches_are_a_function_of_seed_and_step():
    a = [sft.batch_indices(10, 4, s, seed=0) for s in range(5)]
    assert all(len(set(x)) == 4 for x in a[:2])
    np.testing.assert_array_equal(np.sort(np.concatenate(a[:2] + [a[2][:2]])), np.arange(10))  # one epoch
    np.testing.assert_array_equal(sft.batch_indices(10, 4, 3, seed=0), a[3])
    assert not np.array_equal(sft.batch_indices(10, 4, 0, seed=1), a[0])


# -- loss ---------------------------------------------------------------------------------------

def test_loss_is_on_answer_tokens_only(tiny):
    model, tok = tiny
    rng = np.random.default_rng(0)
    logits = jnp.asarray(rng.normal(size=(2, 9, 11)), jnp.float32)
    labels = jnp.asarray(rng.integers(0, 11, (2, 9)))
    w = jnp.zeros((2, 9)).at[0, 5:8].set(1).at[1, 3:6].set(1)

    def mean(lg, lab):
        s, n = sft.token_loss(lg, lab, w)
        return s / n

    other = jnp.where(w > 0, labels, (labels + 3) % 11)  # change every prompt/padding target
    assert float(mean(logits, other)) == float(mean(logits, labels))
    g = np.asarray(jax.grad(mean)(logits, labels))
    assert (g[np.asarray(w) == 0] == 0).all()
    assert (np.abs(g[np.asarray(w) > 0]).sum(-1) > 0).all()
    lp = jax.nn.log_softmax(logits)
    want = -jnp.sum(jnp.take_along_axis(lp, labels[..., None], -1)[..., 0] * w) / w.sum()
    np.testing.assert_allclose(float(mean(logits, labels)), float(want), rtol=1e-6)

    # through the model: logits at the answer positions only == the full-sequence loss
    exs = sft.build_examples(tok, _items(3), n_shots=0)
    T, P = sft.shapes(exs)
    b = sft.to_device(sft.collate(exs, T, P))
    params = model.params()
    got = float(sft.mean_loss(params, model.config, b))
    full = model(b.tokens, mask=b.mask).logits
    s, n = sft.token_loss(full, b.labels, b.weights)
    np.testing.assert_allclose(got, float(s / n), rtol=1e-5)
    changed = b._replace(labels=jnp.where(b.weights > 0, b.labels, 5))
    assert float(sft.mean_loss(params, model.config, changed)) == got
    answer_changed = b._replace(labels=jnp.where(b.weights > 0, 5, b.labels))
    assert float(sft.mean_loss(params, model.config, answer_changed)) != got


def _train(model, tok, method, steps, **over):
    scfg = dataclasses.replace(sft.SFTConfig(lr=3e-3, steps=steps, batch_size=4, micro_batch_size=2,
                                             lora_r=4, lora_alpha=8.0), **over)
    exs = sft.build_examples(tok, _items(4), n_shots=0)
    T, P = sft.shapes(exs)
    master, opt_state, frozen, opt = sft.init_state(method, model.params(), scfg)
    state = types.SimpleNamespace(master=master, opt_state=opt_state)
    step = sft.make_step(method, scfg, model.config, opt, model.dtype)
    fixed = sft.to_device(sft.collate(exs, T, P))
    losses = []
    for s in range(steps):
        b = sft.to_device(sft.step_batch(exs, scfg, s, T, P, 0))
        mb = scfg.micro_batch_size or scfg.batch_size
        assert b.tokens.shape[:2] == (scfg.batch_size // mb, mb)
        state.master, state.opt_state, loss, _ = step(state.master, state.opt_state, frozen, b,
                                                     sft.dropout_key(scfg, s))
        losses.append(float(loss))
    final = sft.working_params(method, state.master, frozen, model.dtype, scfg)
    return state, frozen, scfg, losses, float(sft.mean_loss(model.params(), model.config, fixed)), \
        float(sft.mean_loss(final, model.config, fixed))


def test_full_sft_lowers_the_training_loss(tiny):
    model, tok = tiny
    state, frozen, _, losses, before, after = _train(model, tok, "sft_full", 5)
    assert frozen is None
    assert after < before - 0.1, (before, after)
    assert losses[-1] < losses[0]
    assert all(x.dtype == jnp.float32 for x in jax.tree.leaves(state.master))
    changed = [not np.array_equal(np.asarray(a, np.float32), np.asarray(b))
               for a, b in zip(jax.tree.leaves(model.params()), jax.tree.leaves(state.master))]
    assert all(changed)


def test_gradient_accumulation_equals_one_big_batch(tiny):
    model, tok = tiny
    p0 = model.params()
    a = _train(model, tok, "sft_full", 1, optimizer="sgd", clip=None, lr=1.0)[0].master
    b = _train(model, tok, "sft_full", 1, optimizer="sgd", clip=None, lr=1.0, micro_batch_size=None)[0].master
    for x, y, p in zip(jax.tree.leaves(a), jax.tree.leaves(b), jax.tree.leaves(p0)):
        ga, gb = np.asarray(p) - np.asarray(x), np.asarray(p) - np.asarray(y)  # the gradients
        np.testing.assert_allclose(ga, gb, rtol=1e-3, atol=1e-4 * np.abs(gb).max())


# -- LoRA ---------------------------------------------------------------------------------------

def test_lora_shapes_and_init_is_the_base_model(tiny):
    model, _ = tiny
    params = model.params()
    c = model.config
    L, D, H, KV, Dh, F = c.num_layers, c.hidden_size, c.num_heads, c.num_kv_heads, c.head_dim, c.intermediate_size
    ad = lora.init(params, lora.DEFAULT_TARGETS, 4, jax.random.PRNGKey(0))
    want = {"q": ((L, D, 4), (L, 4, H, Dh)), "k": ((L, D, 4), (L, 4, KV, Dh)), "v": ((L, D, 4), (L, 4, KV, Dh)),
            "o": ((L, H, Dh, 4), (L, 4, D)), "gate": ((L, D, 4), (L, 4, F)), "up": ((L, D, 4), (L, 4, F)),
            "down": ((L, F, 4), (L, 4, D))}
    assert {t: (a["a"].shape, a["b"].shape) for t, a in ad.items()} == want
    assert all(not np.asarray(a["b"]).any() and np.asarray(a["a"]).std() > 0 for a in ad.values())
    merged = lora.merge(params, ad, 2.0)
    for x, y in zip(jax.tree.leaves(params), jax.tree.leaves(merged)):
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y))
    assert lora.num_params(ad) == sum(x.size for x in jax.tree.leaves(ad))
    assert lora.target_parameters(params, ["q", "down"]) == L * D * H * Dh + L * F * D
    with pytest.raises(CCAError, match="lora_targets"):
        lora.init(params, ["q", "lm_head"], 4, jax.random.PRNGKey(0))


def test_lora_merged_forward_equals_the_unmerged_reference(tmp_path):
    """Our merged weights vs transformers with a separate LoRA branch on every target
    module (x @ W^T + scale * (x @ A) @ B): checks which axes are inputs and outputs."""
    import tiny as tiny_hf
    import torch

    hf = tiny_hf.hf_model("llama")
    hf.save_pretrained(tmp_path)
    model, _ = cca_jax.load_model(tmp_path)
    params = model.params()
    scale = 2.0
    ad = lora.init(params, lora.DEFAULT_TARGETS, 3, jax.random.PRNGKey(1))
    keys = jax.random.split(jax.random.PRNGKey(2), len(ad))
    ad = {t: {"a": a["a"], "b": 0.1 * jax.random.normal(k, a["b"].shape)} for (t, a), k in zip(ad.items(), keys)}
    merged = model.with_params(lora.merge(params, ad, scale))
    ids = tiny_hf.tokens(2, 10)
    ours = np.asarray(merged(jnp.asarray(ids)).logits)
    base = np.asarray(model(jnp.asarray(ids)).logits)
    assert np.abs(ours - base).max() > 0.05  # the adapters matter

    modules = {"q": "self_attn.q_proj", "k": "self_attn.k_proj", "v": "self_attn.v_proj", "o": "self_attn.o_proj",
               "gate": "mlp.gate_proj", "up": "mlp.up_proj", "down": "mlp.down_proj"}
    handles = []
    for t, name in modules.items():
        a, b = np.asarray(ad[t]["a"]), np.asarray(ad[t]["b"])
        for i, layer in enumerate(hf.model.layers):
            A = torch.tensor(a[i].reshape(-1, a.shape[-1]))
            B = torch.tensor(b[i].reshape(b.shape[1], -1))
            mod = layer.get_submodule(name)
            handles.append(mod.register_forward_hook(
                lambda m, inp, out, A=A, B=B: out + scale * (inp[0] @ A) @ B))
    with torch.no_grad():
        ref = hf(torch.as_tensor(ids, dtype=torch.long)).logits.numpy()
    for h in handles:
        h.remove()
    assert np.abs(ours - ref).max() <= 1e-4


def test_lora_training_changes_only_the_adapters(tiny):
    model, tok = tiny
    before = jax.tree.map(np.asarray, model.params())
    init_master, _, _, _ = sft.init_state("sft_lora", model.params(), sft.SFTConfig(lora_r=4, lora_alpha=8.0))
    state, frozen, scfg, losses, loss0, loss1 = _train(model, tok, "sft_lora", 4)
    assert set(state.master) == set(lora.DEFAULT_TARGETS)
    for t, a in state.master.items():
        assert set(a) == {"a", "b"}
        assert np.asarray(a["b"]).any()  # B left zero
        assert not np.array_equal(np.asarray(a["a"]), np.asarray(init_master[t]["a"]))
    for x, y in zip(jax.tree.leaves(before), jax.tree.leaves(frozen)):  # base weights untouched
        np.testing.assert_array_equal(x, np.asarray(y))
    for x, y in zip(jax.tree.leaves(before), jax.tree.leaves(model.params())):
        np.testing.assert_array_equal(x, np.asarray(y))
    assert loss1 < loss0
    assert sft.trainable_parameters("sft_lora", state.master) == lora.num_params(state.master)
    # dropout: a training forward drops input features of A, evaluation never does
    ad = state.master
    p0 = lora.apply(frozen, ad, scfg.lora_scale)
    p1 = lora.apply(frozen, ad, scfg.lora_scale, dropout=0.5, key=jax.random.PRNGKey(0))
    p2 = lora.apply(frozen, ad, scfg.lora_scale, dropout=0.5, key=jax.random.PRNGKey(1))
    q = lambda p: np.asarray(p["layers"]["attn"]["q"])
    assert not np.array_equal(q(p0), q(p1)) and not np.array_equal(q(p1), q(p2))
    np.testing.assert_array_equal(q(p0), q(sft.working_params("sft_lora", ad, frozen, model.dtype, scfg)))
    # dropped rows of A: the weight change of that input feature is exactly zero
    keep = jax.random.bernoulli(jax.random.split(jax.random.PRNGKey(0), len(ad))[sorted(ad).index("q")], 0.5,
                                ad["q"]["a"].shape[:-1])
    dq = q(p1) - np.asarray(frozen["layers"]["attn"]["q"])
    assert (dq[~np.asarray(keep)] == 0).all() and (dq[np.asarray(keep)] != 0).any()


# -- pipeline -----------------------------------------------------------------------------------

def _strip(summary):
    return {k: v for k, v in summary.items() if k not in ("timings_seconds", "wall_seconds")}


def _ckpt(stage_dir, name):
    """A committed checkpoint's tree: state_master / state_opt (the last step's) or
    best_master, as {dotted leaf key: array}."""
    prog = json.loads((stage_dir / "progress.json").read_text())
    ckpt = prog["best"] if name == "best_master" else prog["checkpoint"]
    tree = "opt" if name == "state_opt" else "master"
    return {k: np.asarray(v) for k, v in stages.load_flat(stage_dir / ckpt, tree).items()}


@pytest.fixture(scope="module")
def lora_run(tmp_path_factory):
    d = tmp_path_factory.mktemp("sft_lora")
    cfg = runconfig.load(CONFIG, ["method=sft_lora"])
    return cfg, d, pipeline.run(cfg, d, progress=False, log=lambda s: None)


@pytest.fixture(scope="module")
def full_run(lora_run, tmp_path_factory):
    d = tmp_path_factory.mktemp("sft_full")
    shutil.copytree(lora_run[1], d, dirs_exist_ok=True)  # reuses the base evaluation
    cfg = runconfig.load(CONFIG, ["method=sft_full"])
    logs = []
    s = pipeline.run(cfg, d, progress=False, log=logs.append)
    return cfg, d, s, logs


def _check_common(s, cfg, d, model):
    total = model.config.num_components
    assert s["components_total"] == s["components_selected"] == total and s["fraction_components"] == 1.0
    assert set(s["val_accuracy_by_step"]) == {"0", "2", "4", "6"}
    assert set(s["loss_by_step"]) == {str(i) for i in range(1, 7)}
    assert s["best_step"] in (0, 2, 4, 6)
    assert s["val_accuracy_by_step"][str(s["best_step"])] == max(s["val_accuracy_by_step"].values())
    assert s["train_examples"] == 10 * len(s["selected_templates"])  # 10 train items per toy template
    assert s["total_parameters"] == sum(x.size for x in jax.tree.leaves(model.params()))
    for key in ("test_accuracy_before", "test_accuracy_after", "test_accuracy_selected_templates",
                "timings_seconds", "components_per_layer"):
        assert key in s
    assert json.loads((d / "summary.json").read_text()) == json.loads(json.dumps(s))
    assert (d / "plots" / "val_accuracy.png").exists()


def test_sft_lora_run_summary(lora_run, tiny):
    cfg, d, s = lora_run
    model, _ = tiny
    _check_common(s, cfg, d, model)
    c = model.config
    L, D, H, KV, Dh, F = c.num_layers, c.hidden_size, c.num_heads, c.num_kv_heads, c.head_dim, c.intermediate_size
    r = cfg.sft.lora_r
    adapter = L * r * ((D + H * Dh) + 2 * (D + KV * Dh) + (H * Dh + D) + 2 * (D + F) + (F + D))
    assert s["method"] == "sft_lora"
    assert s["trainable_parameters"] == s["lora"]["adapter_parameters"] == adapter
    targeted = L * (D * H * Dh + 2 * D * KV * Dh + H * Dh * D + 3 * D * F)
    assert s["fraction_parameters_changed"] == pytest.approx(targeted / s["total_parameters"])
    assert 0 < s["fraction_parameters_changed"] < 1
    assert s["lora"]["targets"] == list(lora.DEFAULT_TARGETS)
    assert s["loss_by_step"]["6"] < s["loss_by_step"]["1"]
    master = _ckpt(d / "stages" / "sft", "state_master")
    assert set(master) == {f"{t}.{ab}" for t in lora.DEFAULT_TARGETS for ab in "ab"}


def test_sft_full_run_summary(lora_run, full_run, tiny):
    cfg, d, s, logs = full_run
    model, _ = tiny
    _check_common(s, cfg, d, model)
    assert s["method"] == "sft_full"
    assert s["fraction_parameters_changed"] == 1.0
    assert s["trainable_parameters"] == s["total_parameters"] and "lora" not in s
    assert s["loss_by_step"]["6"] < s["loss_by_step"]["1"]
    done = lambda run_dir: json.loads((run_dir / "stages" / "base_eval" / "done.json").read_text())
    assert done(d) == done(lora_run[1])  # the base evaluation was reused, not rerun


def _pick_step_4(monkeypatch):
    """Val accuracy 1.0 at step 4 (the tiny random model never answers right), so the best
    step is a trained one, neither the base model nor the last step."""
    real = gsm.evaluate

    def fake(*a, desc="eval", **kw):
        acc, recs = real(*a, desc=desc, **kw)
        return (dataclasses.replace(acc, overall=1.0) if desc == "val step 4" else acc), recs

    monkeypatch.setattr(gsm, "evaluate", fake)


_PICKED = {}


@pytest.fixture(scope="module")
def picked(lora_run, tmp_path_factory):
    """method -> (config, run dir, summary) of a run whose best step is 4."""

    def get(method):
        if method not in _PICKED:
            d = tmp_path_factory.mktemp(f"picked_{method}")
            shutil.copytree(lora_run[1] / "stages" / "base_eval", d / "stages" / "base_eval")
            cfg = runconfig.load(CONFIG, [f"method={method}"])
            with pytest.MonkeyPatch.context() as mp:
                _pick_step_4(mp)
                _PICKED[method] = cfg, d, pipeline.run(cfg, d, progress=False, log=lambda s: None)
        return _PICKED[method]

    yield get
    _PICKED.clear()


def test_killed_sft_run_resumes_to_the_same_result(picked, tmp_path, monkeypatch):
    cfg, d, want = picked("sft_lora")
    assert want["best_step"] == 4
    shutil.copytree(d / "stages" / "base_eval", tmp_path / "stages" / "base_eval")
    _pick_step_4(monkeypatch)

    def kill(step):
        if step == 3:
            raise Killed

    with pytest.raises(Killed):
        pipeline.run(cfg, tmp_path, progress=False, on_amplify_step=kill, log=lambda s: None)
    assert json.loads((tmp_path / "stages" / "sft" / "progress.json").read_text())["step"] == 2
    logs = []
    got = pipeline.run(cfg, tmp_path, progress=False, log=logs.append)
    assert any("resuming sft_lora at step 2" in m for m in logs)
    assert _strip(got) == _strip(want)
    for name in ("state_master", "state_opt", "best_master"):
        a, b = _ckpt(tmp_path / "stages" / "sft", name), _ckpt(d / "stages" / "sft", name)
        assert set(a) == set(b)
        for k in b:
            np.testing.assert_array_equal(a[k], b[k])


@pytest.mark.parametrize("method", ["sft_lora", "sft_full"])
def test_export_of_the_best_finetuned_model(picked, tmp_path, method):
    """export: true writes the best step's weights (LoRA merged) as a HF directory that
    transformers loads with our logits."""
    import torch
    import transformers

    _, d, first = picked(method)
    assert first["best_step"] == 4 and "export_dir" not in first
    shutil.copytree(d, tmp_path / "r", dirs_exist_ok=True)
    cfg = runconfig.load(CONFIG, [f"method={method}", "export=true"])
    s = pipeline.run(cfg, tmp_path / "r", progress=False, log=lambda m: None)  # finished stages reused
    assert _strip({k: v for k, v in s.items() if k != "export_dir"}) == _strip(first)
    assert s["export_dir"] == pipeline.SFT_EXPORT_DIR
    out = tmp_path / "r" / s["export_dir"]
    model, _ = cca_jax.load_model(cfg.model)
    init_master, _, frozen, _ = sft.init_state(method, model.params(), cfg.sft)

    def master(which):
        return stages.unflatten(pipeline.saved_master(tmp_path / "r", "sft", which), init_master)

    want = sft.working_params(method, master("best"), frozen, model.dtype, cfg.sft)
    last = sft.working_params(method, master("current"), frozen, model.dtype, cfg.sft)
    ours, _ = cca_jax.load_model(out)
    q = lambda p: np.asarray(p["layers"]["attn"]["q"])
    assert not np.array_equal(q(want), q(model.params())) and not np.array_equal(q(want), q(last))
    for x, y in zip(jax.tree.leaves(want), jax.tree.leaves(ours.params())):
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y))
    hf = transformers.AutoModelForCausalLM.from_pretrained(out).eval()
    ids = np.arange(3, 15)[None]
    with torch.no_grad():
        ref = hf(torch.as_tensor(ids)).logits.numpy()
    np.testing.assert_allclose(np.asarray(ours(jnp.asarray(ids)).logits), ref, atol=1e-4)


def test_sft_config_errors(tmp_path, capsys):
    with pytest.raises(CCAError, match="method must be one of cca, sft_full, sft_lora"):
        runconfig.load(CONFIG, ["method=sft"])
    for bad, msg in (["sft.lorar=3", "unknown key(s) lorar"], ["sft.lora_targets=[q, lm_head]", "lora_targets"],
                     ["sft.optimizer=lion", "sft.optimizer"], ["sft.micro_batch_size=3", "micro_batch_size"],
                     ["sft.lora_dropout=1.0", "lora_dropout"], ["sft.lr=fast", "sft.lr must be a number"],
                     ["sft.eval_steps=0", "eval_steps"], ["sft.schedule=step", "sft.schedule"]):
        with pytest.raises(CCAError, match=msg.replace("(", r"\(").replace(")", r"\)")):
            runconfig.load(CONFIG, [bad])
    assert runconfig.load(CONFIG, ["sft.lr=1e-5"]).sft.lr == 1e-5  # YAML text "1e-5" is a number here
    assert cli.main(["run", str(CONFIG), "--set", "method=dpo"]) == 2
    err = capsys.readouterr().err.strip()
    assert "method must be one of" in err and len(err.splitlines()) == 1
    for path in ("configs/qwen2.5-coder-0.5b-sft-full.yaml", "configs/qwen2.5-coder-0.5b-sft-lora.yaml"):
        c = runconfig.load(Path(__file__).parent.parent / path)
        base = runconfig.load(Path(__file__).parent.parent / "configs/qwen2.5-coder-0.5b.yaml")
        assert c.method in ("sft_full", "sft_lora") and (c.data, c.eval, c.dtype) == (base.data, base.eval, base.dtype)
        assert (c.sft.lr, c.sft.optimizer, c.sft.weight_decay, c.sft.clip, c.sft.schedule) == \
            (1e-5, "adamw", 0.01, 1.0, "cosine")
        assert (c.sft.lora_r, c.sft.lora_alpha, c.sft.lora_dropout) == (16, 32.0, 0.1)
        assert set(c.sft.lora_targets) == {"q", "k", "v", "o", "gate", "up", "down"}


def test_cli_prints_an_sft_run_and_cca_summaries_name_their_method(lora_run, tmp_path, capsys):
    cfg, d, s = lora_run
    shutil.copytree(d, tmp_path / "r", dirs_exist_ok=True)
    assert cli.main(["run", str(CONFIG), "--quiet", "--out", str(tmp_path / "r"), "--set", "method=sft_lora"]) == 0
    assert "test accuracy before" in capsys.readouterr().out
    # CCA on the same base evaluation: its summary says "method": "cca"
    shutil.copytree(d / "stages" / "base_eval", tmp_path / "cca" / "stages" / "base_eval")
    cca = pipeline.run(runconfig.load(CONFIG, ["dcm.epochs=1", "amplify.steps=1", "amplify.eval_steps=[1]"]),
                       tmp_path / "cca", progress=False, log=lambda m: None)
    assert cca["method"] == "cca" and "trainable_parameters" not in cca
