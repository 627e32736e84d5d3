"""Pivotal tokens: prefix and (batched) branching on the tiny model with real judging."""

import pytest

import cca_jax
from cca_jax import runconfig
from cca_jax.cca import pivots
from cca_jax.char_tokenizer import char_tokenizer
from cca_jax.data import answers, gsm_symbolic
from cca_jax.data.prompt import encode
from cca_jax.generate import generate

from tiny import CONFIG


@pytest.fixture(scope="module")
def setup():
    cfg = runconfig.load(CONFIG)
    model, _ = cca_jax.load_model(cfg.model)
    tok = char_tokenizer(model.config.vocab_size)
    items = gsm_symbolic.load_items("toy:digits", 12, 0)
    kw = dict(stop=answers.stop_rule(tok), pad_token_id=0, eos_token_id=[tok.eos_token_id], batch_size=32)
    prompts = [encode(tok, it.question, n_shots=0) for it in items]
    outs = generate(model, prompts, 12, **kw)

    def judge_for(i):
        return lambda ids: answers.is_correct(answers.extract(tok.decode(list(ids)), "fixed"), items[i].answer)

    greedy = [pivots.Trace(tuple(p), tuple(o), judge_for(i)(o)) for i, (p, o) in enumerate(zip(prompts, outs))]
    return model, tok, items, greedy, judge_for, kw


def test_first_difference_and_prefix_pivot():
    g = pivots.Trace((1, 2), (5, 6, 7), False)
    s = pivots.Trace((1, 2), (5, 9, 7), True)
    ex = pivots.prefix_pivot(g, s, 3, 4)
    assert ex.prefix == (1, 2, 5) and (ex.desired, ex.undesired) == (9, 6)
    assert pivots.prefix_pivot(g, pivots.Trace((1, 2), (5, 6), True), 3, 4) is None  # no differing position


@pytest.mark.parametrize("method", ["prefix", "branching"])
def test_localize_examples_are_oriented_toward_correct(setup, method):
    model, tok, items, greedy, judge_for, kw = setup
    cfg = pivots.PivotConfig(method=method, n_samples=6, max_new_tokens=12, seed=1)
    keys = [(it.template, it.instance) for it in items]
    exs, stats = pivots.localize(model, greedy, keys, judge_for, cfg, kw, progress=False)
    assert stats["examples"] == len(exs) > 0 and stats["flipped"] >= len(exs)
    index = {(it.template, it.instance): i for i, it in enumerate(items)}
    for ex in exs:
        i = index[(ex.template, ex.instance)]
        g = greedy[i]
        assert ex.desired != ex.undesired
        assert ex.prefix[: len(g.prompt)] == g.prompt
        if method == "branching":
            # greedy completion after the desired token is right, after the undesired wrong
            head = list(ex.prefix[len(g.prompt):])
            ok = []
            for t in (ex.desired, ex.undesired):
                budget = 12 - len(head) - 1
                out = generate(model, [list(ex.prefix) + [t]], budget, **kw)[0] if budget > 0 else []
                ok.append(judge_for(i)(head + [t] + list(out)))
            assert ok == [True, False]
        else:
            # prefix: the pivot is the first place the greedy trace and a sampled one part
            n = len(ex.prefix) - len(g.prompt)
            assert ex.prefix[len(g.prompt):] == g.tokens[:n]
            assert g.tokens[n] in (ex.desired, ex.undesired)


def test_fixed_rows_sample_every_round_with_one_program(setup):
    """pivots.batch_size: every round's batches have one size (the rows of the first
    round, rounded up), so the shrinking rounds compile no new programs."""
    from cca_jax import timing

    model, tok, items, greedy, judge_for, kw = setup
    assert [pivots.sampling_rows(512, n) for n in (3, 40, 65, 260, 513)] == [4, 64, 128, 320, 320]
    assert pivots.sampling_rows(64, 260) == 64
    keys = [(it.template, it.instance) for it in items]
    cfg = pivots.PivotConfig(n_samples=6, max_new_tokens=12, seed=1, batch_size=40)  # 12 items -> 16 rows
    with timing.account() as acc:
        exs, stats = pivots.localize(model, greedy, keys, judge_for, cfg, kw, progress=False)
    # the items still pending shrink round by round (flipped ones leave) ...
    assert 0 < stats["flipped"] < len(items)
    # ... and yet one sampling program served every round
    assert acc.programs["decode_chunk"][0] == 1
    # greedy decoding is the same on padded batches of any size
    prompts = [list(g.prompt) for g in greedy[:3]]
    assert generate(model, prompts, 12, **{**kw, "batch_size": 16, "fixed_rows": True}) == generate(model, prompts, 12,
                                                                                                       **kw)
