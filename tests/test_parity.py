"""Every family matches transformers on tiny random configs (float32, max abs <= 1e-4)."""

import jax.numpy as jnp
import numpy as np
import pytest

import cca_jax
import tiny

TOL, hf_logits = tiny.TOL, tiny.hf_logits


def hf_projections(model, ids):
    """Per-layer q/k/v projection outputs and MLP hidden activations, via hooks."""
    got = {"q": [], "k": [], "v": [], "mlp": []}
    hooks = []
    for layer in model.model.layers:
        a = layer.self_attn
        for name, mod in (("q", a.q_proj), ("k", a.k_proj), ("v", a.v_proj)):
            hooks.append(mod.register_forward_hook(lambda m, i, o, name=name: got[name].append(o.detach().numpy())))
        hooks.append(layer.mlp.down_proj.register_forward_hook(
            lambda m, i, o: got["mlp"].append(i[0].detach().numpy())))
    hf_logits(model, ids)
    for h in hooks:
        h.remove()
    return {k: np.stack(v) for k, v in got.items()}


@pytest.mark.parametrize("family", tiny.FAMILIES)
def test_logits_and_components_match_transformers(hf_dirs, family):
    hf, d = hf_dirs[family]
    model, _ = cca_jax.load_model(d)
    ids = tiny.tokens(2, 13)  # longer than the sliding window (4)
    assert ids.shape[1] > tiny.WINDOW
    ref = hf_logits(hf, ids)
    out = model(jnp.asarray(ids), collect=True)
    assert np.abs(np.asarray(out.logits) - ref).max() <= TOL
    # the checks would pass trivially if logits were flat: make sure they are not
    assert ref.std() > 0.1
    cfg = model.config
    proj = hf_projections(hf, ids)
    L, B, T = cfg.num_layers, 2, 13
    for name, n in (("q", cfg.num_heads), ("k", cfg.num_kv_heads), ("v", cfg.num_kv_heads)):
        want = proj[name].reshape(L, B, T, n, cfg.head_dim)
        assert np.abs(np.asarray(out.activations[name]) - want).max() <= TOL, name
    assert np.abs(np.asarray(out.activations["mlp"]) - proj["mlp"]).max() <= TOL


def test_softcaps_and_window_are_active(hf_dirs):
    """Gemma-2's caps and window change the logits: the parity test exercises them."""
    _, d = hf_dirs["gemma2"]
    model, _ = cca_jax.load_model(d)
    ids = jnp.asarray(tiny.tokens(2, 13))
    base = np.asarray(model(ids).logits)
    assert np.abs(base).max() <= model.config.final_logit_softcap
    for change in ({"attn_logit_softcap": None}, {"final_logit_softcap": None}, {"sliding_window": 1000}):
        other = cca_jax.forward(model.config.replace(**change), model.params(), ids).logits
        assert np.abs(np.asarray(other) - base).max() > 1e-3, change


@pytest.mark.parametrize("family", ["llama", "gemma2"])
def test_left_padding_matches_unpadded(hf_dirs, family):
    _, d = hf_dirs[family]
    model, _ = cca_jax.load_model(d)
    ids = tiny.tokens(1, 9, seed=3)
    pad = 4
    padded = np.concatenate([np.zeros((1, pad), np.int32), ids], axis=1)
    mask = np.concatenate([np.zeros((1, pad), bool), np.ones((1, 9), bool)], axis=1)
    a = np.asarray(model(jnp.asarray(ids)).logits)[0]
    b = np.asarray(model(jnp.asarray(padded), mask=jnp.asarray(mask)).logits)[0, pad:]
    assert np.abs(a - b).max() <= TOL


@pytest.mark.parametrize("family", tiny.FAMILIES)
def test_kv_cache_prefill_then_decode_matches_full_forward(hf_dirs, family):
    _, d = hf_dirs[family]
    model, _ = cca_jax.load_model(d)
    ids = jnp.asarray(tiny.tokens(2, 11, seed=1))
    full = np.asarray(model(ids).logits)
    cache = cca_jax.init_cache(model.config, batch=2, size=16)
    out = model(ids[:, :6], cache=cache)
    steps = [np.asarray(out.logits)]
    cache = out.cache
    for t in range(6, 11):
        out = model(ids[:, t:t + 1], cache=cache)
        cache = out.cache
        steps.append(np.asarray(out.logits))
    assert int(cache.index) == 11
    assert np.abs(np.concatenate(steps, axis=1) - full).max() <= TOL


def test_logits_at_positions(hf_dirs):
    _, d = hf_dirs["qwen2"]
    model, _ = cca_jax.load_model(d)
    ids = jnp.asarray(tiny.tokens(2, 10))
    full = np.asarray(model(ids).logits)
    at = np.array([[9, 3], [0, 5]])
    part = np.asarray(model(ids, at=jnp.asarray(at)).logits)
    assert part.shape == (2, 2, tiny.VOCAB)
    for b in range(2):
        np.testing.assert_array_equal(part[b], full[b, at[b]])


@pytest.mark.parametrize("family", ["llama", "gemma2"])
def test_causal_query_blocks_match_transformers_and_one_block(hf_dirs, family):
    """Long calls run attention in causal query blocks (only keys up to each block's end):
    with blocks of 4 tokens a 16-token call has 4, and its logits and gradients equal the
    one-block computation and transformers', with left padding and a sliding window."""
    import jax

    from cca_jax.model import transformer as tr
    from cca_jax.model.attention import causal_blocks

    hf, d = hf_dirs[family]
    model, _ = cca_jax.load_model(d)
    ids = tiny.tokens(2, 16, seed=5)
    mask = np.ones((2, 16), bool)
    mask[1, :5] = False  # left padding in the second row
    model = model.with_tuning(min_block=4)
    assert causal_blocks(16, model.config.tuning) == 4
    ref = hf_logits(hf, ids, attention_mask=mask.astype(np.int64))
    got = np.asarray(model(jnp.asarray(ids), mask=jnp.asarray(mask)).logits)
    assert np.abs(got[mask] - ref[mask]).max() <= TOL

    def loss(params):
        lg = tr.forward(model.config, params, jnp.asarray(ids), mask=jnp.asarray(mask)).logits
        return jnp.sum(jnp.where(jnp.asarray(mask)[..., None], lg, 0.0) ** 2) / 1e3

    g4 = jax.grad(loss)(model.params())
    model = model.with_tuning(causal_blocks=1)
    assert causal_blocks(16, model.config.tuning) == 1
    g1 = jax.grad(loss)(model.params())
    one = np.asarray(model(jnp.asarray(ids), mask=jnp.asarray(mask)).logits)
    assert np.abs(one[mask] - got[mask]).max() <= 1e-5
    diffs = jax.tree.leaves(jax.tree.map(lambda a, b: float(jnp.abs(a - b).max()), g4, g1))
    scale = max(jax.tree.leaves(jax.tree.map(lambda a: float(jnp.abs(a).max()), g1)))
    assert scale > 1e-3 and max(diffs) <= 1e-5 * max(1.0, scale)


def test_per_layer_weights_match_stacked(hf_dirs):
    """unstack_layers merges q/k/v and gate/up per layer: the same logits, with a cache."""
    from cca_jax.model.transformer import unstack_layers

    _, d = hf_dirs["qwen2"]  # biases on q/k/v
    model, _ = cca_jax.load_model(d)
    cfg, params = model.config, model.params()
    per = unstack_layers(params)
    assert "qkv" in per["layers"][0]["attn"] and "gate_up" in per["layers"][0]["mlp"]
    ids = jnp.asarray(tiny.tokens(2, 9, seed=2))
    cache = cca_jax.init_cache(cfg, batch=2, size=16)
    a = cca_jax.forward(cfg, params, ids[:, :8], cache=cache)
    b = cca_jax.forward(cfg, per, ids[:, :8], cache=cache)
    assert np.abs(np.asarray(a.logits) - np.asarray(b.logits)).max() <= TOL
    a2 = cca_jax.forward(cfg, params, ids[:, 8:], cache=a.cache)
    b2 = cca_jax.forward(cfg, per, ids[:, 8:], cache=b.cache)
    assert np.abs(np.asarray(a2.logits) - np.asarray(b2.logits)).max() <= TOL


@pytest.mark.parametrize("family", ["llama", "gemma2"])
def test_prefill_into_empty_cache_matches_the_general_write_path(hf_dirs, family):
    """A long call into an empty cache (init_cache) attends over its own tokens in causal
    query blocks and writes them after; the same cache flagged non-empty takes the general
    path over every slot. Both equal the full forward, and decoding goes on the same."""
    _, d = hf_dirs[family]
    model, _ = cca_jax.load_model(d)
    model = model.with_tuning(min_block=4)
    ids = tiny.tokens(2, 15, seed=4)
    mask = np.ones((2, 15), bool)
    mask[0, :3] = False  # left padding
    full = np.asarray(model(jnp.asarray(ids), mask=jnp.asarray(mask)).logits)
    empty = cca_jax.init_cache(model.config, batch=2, size=16)
    assert empty.empty
    outs = []
    for cache in (empty, empty.replace(empty=False)):
        out = model(jnp.asarray(ids[:, :12]), mask=jnp.asarray(mask[:, :12]), cache=cache)
        assert not out.cache.empty
        step = model(jnp.asarray(ids[:, 12:]), cache=out.cache)
        outs.append((out, step))
        got = np.concatenate([np.asarray(out.logits), np.asarray(step.logits)], axis=1)
        assert np.abs(got[mask] - full[mask]).max() <= TOL
    (a, a2), (b, b2) = outs
    for x, y in zip(a2.cache.k + a2.cache.v, b2.cache.k + b2.cache.v):
        assert np.abs(np.asarray(x) - np.asarray(y)).max() <= 1e-5


@pytest.mark.parametrize("family", ["llama", "gemma2"])
def test_write_first_decoding_matches_reading_the_cache(hf_dirs, family):
    """Decode steps that write their keys/values before attending (generation's form,
    one softmax over the buffer) give the logits and cache of the default form (cache
    read as a constant, new keys in a second block, written after), with left padding."""
    from cca_jax.model.transformer import unstack_layers

    _, d = hf_dirs[family]
    model, _ = cca_jax.load_model(d)
    cfg, params = model.config, unstack_layers(model.params())
    ids = tiny.tokens(2, 14, seed=8)
    mask = np.ones((2, 14), bool)
    mask[1, :4] = False
    full = np.asarray(model(jnp.asarray(ids), mask=jnp.asarray(mask)).logits)
    pre = model(jnp.asarray(ids[:, :10]), mask=jnp.asarray(mask[:, :10]),
                cache=cca_jax.init_cache(cfg, batch=2, size=16))
    caches = {False: pre.cache, True: pre.cache}
    for t in range(10, 14):
        outs = {}
        for wf in (False, True):
            outs[wf] = cca_jax.forward(cfg, params, jnp.asarray(ids[:, t:t + 1]), cache=caches[wf], write_first=wf)
            caches[wf] = outs[wf].cache
            assert np.abs(np.asarray(outs[wf].logits)[:, 0] - full[:, t]).max() <= TOL
        assert np.abs(np.asarray(outs[True].logits) - np.asarray(outs[False].logits)).max() <= 1e-5
    for x, y in zip(caches[True].k + caches[True].v + (caches[True].pos,),
                    caches[False].k + caches[False].v + (caches[False].pos,)):
        np.testing.assert_allclose(np.asarray(x), np.asarray(y), atol=1e-5)


def test_bfloat16_cached_calls_run_on_cpu(hf_dirs):
    """bf16 weights and cache on CPU (the demo's setting): XLA's CPU runtime has no
    bf16 x bf16 -> f32 dot for the cached-attention layout, so those operands are upcast
    there. Prefill plus decode stays close to the full bf16 forward, and a DCM step runs."""
    from cca_jax.cca import components, dcm
    from cca_jax.model.transformer import unstack_layers

    _, d = hf_dirs["gemma2"]
    model, _ = cca_jax.load_model(d, dtype="bfloat16")
    cfg = model.config
    ids = jnp.asarray(tiny.tokens(2, 12, seed=6))
    full = np.asarray(model(ids).logits)
    out = model(ids[:, :10], cache=cca_jax.init_cache(cfg, batch=2, size=16, dtype=jnp.bfloat16))
    step = model(ids[:, 10:], cache=out.cache)
    got = np.concatenate([np.asarray(out.logits), np.asarray(step.logits)], axis=1)
    assert np.abs(got - full).max() <= 0.1 * max(1.0, np.abs(full).max())
    cache = dcm.prefix_cache(cfg, model.params(), ids, jnp.ones(ids.shape, bool))
    c = dcm.DCMConfig()
    opt = dcm.make_optimizer(c, 1)
    m0 = components.full(cfg, 1.0)
    m1, _, loss, _ = dcm.mask_step(cfg, opt, c.reg, c.mode, unstack_layers(model.params()), m0, opt.init(m0),
                                   cache, ids[:, -1], ids[:, 0], ids[:, 1])
    assert np.isfinite(float(loss))
    # generation (write-first decode steps) in bf16: the greedy tokens of the full forward
    from cca_jax.generate import generate

    prompt = tiny.tokens(1, 8, seed=7)[0].tolist()
    got = generate(model, [prompt], 3, eos_token_id=[])[0]
    seq = list(prompt)
    for _ in range(3):
        seq.append(int(np.argmax(np.asarray(model(jnp.asarray([seq])).logits)[0, -1])))
    assert got == seq[8:]


def test_tuning_is_static_runtime_config_never_saved(hf_dirs):
    """Performance switches live in ModelConfig.tuning: part of every compiled program's
    key (a changed value compiles anew instead of being ignored), never saved."""
    import jax

    from cca_jax.config import ModelConfig, Tuning
    from cca_jax.errors import CCAError

    _, d = hf_dirs["llama"]
    model, _ = cca_jax.load_model(d)
    cfg = model.config
    assert cfg.tuning == Tuning() and "tuning" not in cfg.to_dict()
    assert ModelConfig.from_dict(cfg.to_dict()) == cfg.replace(attention="xla")
    small = model.with_tuning(min_block=4)
    assert small.config.tuning == Tuning(min_block=4) and small.config.replace(tuning=Tuning()) == cfg
    f = jax.jit(lambda c, p, t: cca_jax.forward(c, p, t).logits, static_argnums=0)
    ids = jnp.asarray(tiny.tokens(1, 16))
    a, b = f(cfg, model.params(), ids), f(small.config, model.params(), ids)
    assert f._cache_size() == 2  # one program per tuning
    assert np.abs(np.asarray(a) - np.asarray(b)).max() <= 1e-5
    with pytest.raises(CCAError, match="tuning must be a config.Tuning"):
        cfg.replace(tuning={"min_block": 4})
