"""Generation: token-identical to transformers' greedy generate; sampling definitions."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch

import cca_jax
import tiny
from cca_jax.generate import Sampling, common_prefix_len, filter_logits, generate


@pytest.mark.parametrize("family", tiny.FAMILIES)
def test_greedy_token_identical_to_transformers(hf_dirs, family):
    hf, d = hf_dirs[family]
    model, _ = cca_jax.load_model(d)
    prompts = tiny.prompt_batch(8)
    assert len({len(p) for p in prompts}) > 1
    want = tiny.hf_greedy(hf, prompts, 10)
    got = generate(model, prompts, 10, eos_token_id=[], chunk=4)
    assert got == want


def test_eos_stops_a_row_and_is_kept(hf_dirs):
    hf, d = hf_dirs["llama"]
    model, _ = cca_jax.load_model(d)
    prompts = tiny.prompt_batch(8, seed=1)
    free = generate(model, prompts, 12, eos_token_id=[])
    eos = free[0][3]  # a token row 0 emits: make it the EOS
    want = tiny.hf_greedy(hf, prompts, 12, eos=eos)
    got = generate(model, prompts, 12, eos_token_id=eos, chunk=5)
    assert got == want and got[0][-1] == eos and len(got[0]) <= 4


def test_shared_prefix_cache_gives_the_same_tokens(hf_dirs):
    _, d = hf_dirs["gemma2"]  # sliding window: positions must be right after the prefix
    model, _ = cca_jax.load_model(d)
    shared = list(np.random.default_rng(5).integers(3, tiny.VOCAB, size=10))
    prompts = [shared + p for p in tiny.prompt_batch(6, seed=2)]
    assert common_prefix_len(prompts) >= 10
    a = generate(model, prompts, 8, eos_token_id=[], share_prefix=True, min_shared_prefix=4)
    b = generate(model, prompts, 8, eos_token_id=[], share_prefix=False)
    assert a == b


def test_shared_prefix_bucket_reuses_programs_and_keeps_the_tokens(hf_dirs):
    """Pivot sampling makes one call per item (the item's prompt, repeated): the shared
    prefix is the whole prompt, a different length each time. Cut to a multiple of
    ``shared_bucket``, the calls reuse their programs; the tokens are the same."""
    from cca_jax import timing

    _, d = hf_dirs["gemma2"]  # sliding window: positions must be right after the prefix
    model, _ = cca_jax.load_model(d)
    rng = np.random.default_rng(7)
    context = list(rng.integers(3, tiny.VOCAB, size=40))
    items = [context + list(rng.integers(3, tiny.VOCAB, size=n)) for n in (3, 5, 8, 11, 13)]
    compiles, tokens = {}, {}
    for bucket in (1, 32):
        kw = {"eos_token_id": [], "chunk": 4, "shared_bucket": bucket}
        tokens[bucket] = [generate(model, [items[0]] * 3, 6, **kw)]
        with timing.account() as acc:
            tokens[bucket] += [generate(model, [p] * 3, 6, **kw) for p in items[1:]]
        compiles[bucket] = acc.compiles
    assert tokens[1] == tokens[32]
    # shared 42..52 tokens: all cut to 32 (the suffixes share one bucket of 64), against
    # a new prefix length, hence new prefill and cache programs, for every item
    assert 2 * compiles[32] <= compiles[1], compiles


def test_lone_batches_share_a_power_of_two_row_count(hf_dirs):
    """Evaluation makes one call per template and split, each with its own number of
    prompts: a lone batch is padded to a power of two, so calls of 5, 6 and 7 prompts run
    one compiled program (and give the tokens they give one by one)."""
    from cca_jax import timing

    _, d = hf_dirs["qwen2"]
    model, _ = cca_jax.load_model(d)
    prompts = tiny.prompt_batch(7, seed=5)
    kw = {"eos_token_id": [], "chunk": 4, "share_prefix": False}
    generate(model, prompts[:4], 6, **kw)  # compiles the programs of 4 rows
    generate(model, prompts[:5], 6, **kw)  # ... and of 8 rows
    with timing.account() as acc:
        outs = [generate(model, prompts[:n], 6, **kw) for n in (6, 7)]
    assert acc.compiles == 0, acc.compiles
    assert outs[1][:6] == outs[0] and outs[1][:2] == [generate(model, [p], 6, **kw)[0] for p in prompts[:2]]


def test_a_budget_that_is_not_a_whole_number_of_chunks_compiles_no_second_decode_program(hf_dirs):
    """The last decode chunk runs whole and its overrun is dropped: 10 new tokens in chunks
    of 4 decode with the program of 4 steps alone, and give the first 10 of 12."""
    from cca_jax import timing

    _, d = hf_dirs["qwen2"]
    model, _ = cca_jax.load_model(d)
    prompts = tiny.prompt_batch(4, seed=7)
    kw = {"eos_token_id": [], "chunk": 4, "share_prefix": False}
    twelve = generate(model, prompts, 12, **kw)  # compiles the 4-step decode program
    with timing.account() as acc:
        ten = generate(model, prompts, 10, **kw)
    assert acc.programs.get("decode_chunk", (0, 0))[0] == 0, acc.programs
    assert ten == [t[:10] for t in twelve] and all(len(t) == 10 for t in ten)


@pytest.mark.parametrize("share", [True, False])
def test_budgets_of_other_cache_sizes_share_the_prefill_programs(hf_dirs, share):
    """The prompts are prefilled into a cache of their own length, which then grows to
    the budget's: the train/val (512) and test (1500) budgets share prefill programs, and
    each budget's tokens are what it gave with its own cache."""
    from cca_jax import timing

    _, d = hf_dirs["qwen2"]
    model, _ = cca_jax.load_model(d)
    rng = np.random.default_rng(11)
    context = list(rng.integers(3, tiny.VOCAB, size=40))
    prompts = [context + list(rng.integers(3, tiny.VOCAB, size=n)) for n in (3, 6, 9, 12)]
    kw = {"eos_token_id": [], "chunk": 4, "share_prefix": share}
    short = generate(model, prompts, 8, **kw)  # a cache of 128 slots
    with timing.account() as acc:
        long = generate(model, prompts, 160, **kw)  # 256 slots
    assert acc.programs.get("prefill", (0, 0))[0] == 0, acc.programs
    assert [t[:8] for t in long] == short and all(len(t) == 160 for t in long)


def test_weights_read_back_from_a_checkpoint_reuse_the_programs_of_the_loaded_ones(hf_dirs, tmp_path):
    """Trained weights come back from orbax committed to their device; the loaded ones reach
    the same programs: the test evaluation after training compiles nothing new."""
    from cca_jax import stages, timing

    _, d = hf_dirs["qwen2"]
    model, _ = cca_jax.load_model(d)
    fresh = model.with_params(jax.tree.map(lambda x: x * 1, model.params()))  # jit outputs
    prompts = tiny.prompt_batch(4, seed=9)
    kw = {"eos_token_id": [], "chunk": 4, "share_prefix": False}
    want = generate(fresh, prompts, 6, **kw)
    stages.save_trees(tmp_path / "ckpt", {"p": model.params()})
    back = stages.load_trees(tmp_path / "ckpt", {"p": jax.eval_shape(model.params)})["p"]
    with timing.account() as acc:
        got = generate(model.with_params(back), prompts, 6, **kw)
    assert got == want
    assert acc.compiles == 0, acc.programs


def test_batches_and_order(hf_dirs):
    _, d = hf_dirs["qwen2"]
    model, _ = cca_jax.load_model(d)
    prompts = tiny.prompt_batch(7, seed=3)
    whole = generate(model, prompts, 6, eos_token_id=[], batch_size=8)
    split = generate(model, prompts, 6, eos_token_id=[], batch_size=3)
    single = [generate(model, [p], 6, eos_token_id=[])[0] for p in prompts[:2]]
    assert whole == split and whole[:2] == single


def test_stop_rule_cuts_each_row(hf_dirs):
    _, d = hf_dirs["olmo2"]
    model, _ = cca_jax.load_model(d)
    prompts = tiny.prompt_batch(4, seed=4)
    free = generate(model, prompts, 12, eos_token_id=[])
    cut = generate(model, prompts, 12, eos_token_id=[], stop=lambda ids: 3 if len(ids) >= 5 else None, chunk=2)
    assert cut == [row[:3] for row in free]


def test_decode_ahead_same_tokens_and_at_most_one_extra_chunk(hf_dirs, monkeypatch):
    """Sending the next decode chunk before reading the last changes no token, starts no
    chunk past max_new_tokens, and wastes at most one chunk when the rows have finished."""
    from cca_jax import generate as gen

    _, d = hf_dirs["llama"]
    model, _ = cca_jax.load_model(d)
    prompts = tiny.prompt_batch(6, seed=6)
    calls = []
    real = gen.decode_chunk

    def spy(*args, **kw):
        calls.append(args[8])  # steps
        return real(*args, **kw)

    monkeypatch.setattr(gen, "decode_chunk", spy)
    free = generate(model, prompts, 12, eos_token_id=[])
    eos = free[2][1]  # row 2 ends in the first chunk
    runs = {}
    for ahead in (False, True):
        calls.clear()
        plain = generate(model, prompts, 11, eos_token_id=[], chunk=3, ahead=ahead)
        n_plain = list(calls)
        calls.clear()
        ended = generate(model, prompts, 12, eos_token_id=eos, stop=lambda ids: 6 if len(ids) >= 7 else None,
                         chunk=2, ahead=ahead)
        runs[ahead] = (plain, ended, n_plain, list(calls))
    assert runs[True][:2] == runs[False][:2]
    assert runs[True][0] == [r[:11] for r in free]
    # no chunk starts past max_new_tokens; the last runs whole (one program), its overrun dropped
    assert runs[True][2] == runs[False][2] == [3, 3, 3, 3]
    # every row has ended after 4 chunks (the stop rule at 7 tokens); a row ended in the
    # first, yet chunks are still sent ahead: one is wasted, the one sent after the last ended
    assert runs[False][3] == [2] * 4 and runs[True][3] == [2] * 5


def test_sampling_reproducible_with_key(hf_dirs):
    _, d = hf_dirs["gemma3"]
    model, _ = cca_jax.load_model(d)
    prompts = tiny.prompt_batch(4)
    kw = dict(temperature=1.0, top_k=20, top_p=0.9, eos_token_id=[])
    a = generate(model, prompts, 8, key=jax.random.key(1), **kw)
    b = generate(model, prompts, 8, key=jax.random.key(1), **kw)
    c = generate(model, prompts, 8, key=jax.random.key(2), **kw)
    assert a == b and a != c
    with pytest.raises(cca_jax.CCAError, match="PRNG key"):
        generate(model, prompts, 4, temperature=0.7)


def test_filter_definitions():
    logits = jnp.log(jnp.asarray([[0.5, 0.2, 0.15, 0.1, 0.05]]))
    # temperature divides the logits
    np.testing.assert_allclose(filter_logits(logits, Sampling(2.0)), logits / 2.0, rtol=1e-6)
    # top-k keeps exactly the k largest
    fk = np.asarray(filter_logits(logits, Sampling(1.0, top_k=2)))
    assert np.isfinite(fk).tolist() == [[True, True, False, False, False]]
    # top-p keeps the smallest head whose mass reaches p: 0.5 + 0.2 >= 0.6 -> two tokens
    fp = np.asarray(filter_logits(logits, Sampling(1.0, top_p=0.6)))
    assert np.isfinite(fp).tolist() == [[True, True, False, False, False]]
    fp = np.asarray(filter_logits(logits, Sampling(1.0, top_p=0.86)))  # 0.85 < 0.86 -> four
    assert np.isfinite(fp).sum() == 4
    # the filtered distribution is the renormalised kept mass, matching transformers' warpers
    from transformers.generation.logits_process import TemperatureLogitsWarper, TopKLogitsWarper, TopPLogitsWarper

    rng = np.random.default_rng(0)
    x = rng.standard_normal((3, 50)).astype(np.float32) * 3
    t = torch.tensor(x)
    t = TopPLogitsWarper(0.8)(None, TopKLogitsWarper(10)(None, TemperatureLogitsWarper(0.7)(None, t)))
    ours = np.asarray(filter_logits(jnp.asarray(x), Sampling(0.7, top_k=10, top_p=0.8)))
    np.testing.assert_array_equal(np.isfinite(ours), np.isfinite(t.numpy()))
    np.testing.assert_allclose(np.asarray(jax.nn.softmax(ours)), torch.softmax(t, -1).numpy(), atol=1e-6)


def test_sampling_frequencies_follow_filtered_distribution():
    from cca_jax.generate import next_token

    logits = jnp.tile(jnp.log(jnp.asarray([[0.4, 0.3, 0.2, 0.1]])), (20000, 1))
    s = Sampling(1.0, top_k=3)
    toks = np.asarray(next_token(jax.random.key(0), logits, s))
    freq = np.bincount(toks, minlength=4) / len(toks)
    np.testing.assert_allclose(freq, [0.4 / 0.9, 0.3 / 0.9, 0.2 / 0.9, 0.0], atol=0.015)


def test_generation_config_is_what_the_keywords_build(hf_dirs):
    """generate's keywords build a GenerationConfig; generate_with takes one directly."""
    from cca_jax.generate import GenerationConfig, generate_with

    _, d = hf_dirs["llama"]
    model, _ = cca_jax.load_model(d)
    prompts = tiny.prompt_batch(3, seed=7)
    config = GenerationConfig.of(5, eos_token_id=[], chunk=2, write_first=False)
    assert config == GenerationConfig(5, Sampling(), eos_token_id=[], chunk=2, write_first=False)
    got = generate_with(model, prompts, config)
    assert got == generate(model, prompts, 5, eos_token_id=[], chunk=2)
    assert all(len(r) == 5 for r in got)


WARM_SCRIPT = r"""
import json, sys
import numpy as np
import cca_jax
from cca_jax import timing
from cca_jax.generate import generate, warm

timing.enable_cache(timing.cache_dir(sys.argv[1]))
model, _ = cca_jax.load_model("configs/models/tiny-llama.yaml")
rng = np.random.default_rng(3)
context = list(rng.integers(3, 100, size=40))
kw = dict(eos_token_id=[], chunk=4, batch_size=4)
test = [context + list(rng.integers(3, 100, size=n)) for n in (3, 5, 8)]
sampled = dict(temperature=1.0, top_k=5, key=None)
with timing.account() as ahead:
    t1 = warm(model, test, 30, **kw)  # a budget of its own: a cache of other slots
    t2 = warm(model, test, 12, temperature=1.0, top_k=5, **kw)
    t1.join(); t2.join()
import jax
with timing.account() as acc:
    out = generate(model, test, 30, **kw)
    generate(model, test, 12, temperature=1.0, top_k=5, key=jax.random.key(0), **kw)
print(json.dumps({"ahead": ahead.to_json(), "call": acc.to_json(), "out": out}))
"""


def test_programs_compiled_ahead_are_found_by_the_call(tmp_path):
    """generate.warm compiles a later call's prefill and decode programs on a background
    thread (counted as compile_background); the call then finds them ready: it compiles
    neither, and gives the tokens it gives cold."""
    import json
    import subprocess
    import sys
    from pathlib import Path

    root = Path(__file__).resolve().parent.parent
    run = subprocess.run([sys.executable, "-c", WARM_SCRIPT, str(tmp_path / "xla")], cwd=root, capture_output=True,
                         text=True, timeout=600)
    assert run.returncode == 0, run.stderr[-2000:]
    got = json.loads(run.stdout.strip().splitlines()[-1])
    ahead, call = got["ahead"], got["call"]
    # one prefill (budgets and sampling share it) and two decode programs
    assert ahead["compiles_background"] == 3 and ahead["compile_background"] > 0
    assert ahead["compiles"] == 0  # the thread's compiles are not the caller's
    # the call compiles only its one-row shared prefix's prefill (not warmed): the batch
    # prefill and both decode programs were ready (in memory, or from the persistent cache)
    progs = call["programs"]
    assert progs.get("decode_chunk", [0])[0] == 0 and progs["prefill"][0] == 1, progs
    model, _ = cca_jax.load_model(str(root / "configs/models/tiny-llama.yaml"))
    rng = np.random.default_rng(3)
    context = list(rng.integers(3, 100, size=40))
    test = [context + list(rng.integers(3, 100, size=n)) for n in (3, 5, 8)]
    assert got["out"] == generate(model, test, 30, eos_token_id=[], chunk=4, batch_size=4)


def test_step_probe_times_each_program_alone_and_changes_no_token(hf_dirs, monkeypatch):
    """CCA_JAX_STEP_PROBE (timing.PROBE_STEPS): every prefill and decode chunk is counted
    and timed on its own, and the tokens are the normal run's."""
    from cca_jax import timing

    _, d = hf_dirs["qwen2"]
    model, _ = cca_jax.load_model(d)
    prompts = tiny.prompt_batch(4, seed=3)
    kw = {"eos_token_id": [], "chunk": 4, "share_prefix": False}
    with timing.account() as plain:
        want = generate(model, prompts, 12, **kw)
    monkeypatch.setattr(timing, "PROBE_STEPS", True)
    with timing.account() as probed:
        got = generate(model, prompts, 12, **kw)
    assert got == want
    assert probed.work == plain.work and not plain.steps
    assert {k.split()[0] for k in probed.work} == {"prefill", "decode_chunk"}
    probe = probed.to_json()["step_probe"]
    assert set(probe) == set(probed.work)
    for kind, (calls, median, total) in probe.items():
        assert calls == probed.work[kind] and median > 0 and total == pytest.approx(calls * median, abs=1e-3)
