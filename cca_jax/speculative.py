"""Exact speculative decoding for ``generate`` (``speculative: ngram | model``).

A plain decode step reads every weight to produce one token per row, so it cannot beat
the bytes-per-step floor. Here each step drafts ``k`` tokens per row cheaply, runs one
forward over the k + 1 positions (the row's last token and its draft) on the KV cache,
and keeps per row the longest draft prefix that decoding itself would have produced,
plus the token the model gives after it: 1 to k + 1 tokens per forward.

- Greedy: a draft token is kept when it equals the argmax at its position, so the
  output is the greedy output (exactly, up to floating-point ties: the verify forward
  runs k + 1 tokens where plain decoding runs one).
- Sampling: draft token d (a point mass: the draft is deterministic) is kept with the
  probability p(d) of the filtered distribution p (temperature, top-k, top-p); at the
  first rejection the token is drawn from p without d, renormalised (the standard
  rejection rule), and after k kept drafts from p at the next position. Every token then
  has exactly the distribution plain sampling gives it.

Drafts come from the row itself (``ngram``: prompt-lookup decoding: the continuation of
the most recent earlier occurrence of the row's last tokens, in its prompt and output;
chain-of-thought answers copy numbers and phrases from the question and the few-shot
context) or from a small model with the same tokenizer (``model``: its greedy tokens, on
its own cache).

Rows advance by different amounts. Cache slot j holds token j of the row's buffer
(``[shared prefix | left-padded suffix | generated]``, as ``generate`` lays the cache out),
so each row writes its verify tokens at its own slot (``KVCache.index`` per row) and its
positions follow from its prompt length; slots of rejected drafts get position -1.
The whole loop runs on the device, ``iters`` verify steps per compiled call; between calls
the host applies the stop rule, as ``generate`` does between decode chunks.
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np
from flax import struct

from cca_jax import timing
from cca_jax.config import ModelConfig
from cca_jax.errors import CCAError
from cca_jax.model.cache import KVCache, init_cache, tile_cache, write_rows
from cca_jax.model.prefill import prefill
from cca_jax.model.transformer import forward
from cca_jax.sampling import check_stops, filter_logits, next_token

METHODS = ("off", "ngram", "model")
_NO_TOKEN = -1  # the token buffer's padding: never matches, never drafted


@dataclasses.dataclass(frozen=True)
class Speculation:
    """Static settings of the compiled verify loop (part of its compile key)."""

    method: str  # ngram | model
    k: int  # draft tokens per verify step
    ngram: int  # longest suffix the n-gram lookup matches
    iters: int  # verify steps per compiled call


def check(method: str, k: int, ngram: int, iters: int, draft_model) -> None:
    """One-line errors for bad speculation settings (``generate``'s options)."""
    if method not in METHODS:
        raise CCAError(f"speculative must be one of {', '.join(METHODS)}, got {method!r}")
    for name, v in (("spec_k", k), ("spec_ngram", ngram), ("spec_iters", iters)):
        if isinstance(v, bool) or not isinstance(v, int) or v < 1:
            raise CCAError(f"{name} must be an integer >= 1, got {v!r}")
    if method == "model" and draft_model is None:
        raise CCAError("speculative: model needs a draft model (draft_model=, or generation.draft in a run config)")


@struct.dataclass
class SpecState:
    cache: KVCache  # the model's; ``index`` is set per row before each verify
    tokens: jax.Array  # (B, S) int32: slot j's token, _NO_TOKEN for padding and unwritten slots
    n: jax.Array  # (B,) tokens generated; the last one is pending (not yet in the cache)
    offset: jax.Array  # (B,) position of slot j is j + offset (the row's left padding, negated)
    done: jax.Array  # (B,) bool: EOS emitted, the budget reached, or stopped by the host
    key: jax.Array
    steps: jax.Array  # (B,) verify steps the row took part in
    accepted: jax.Array  # (B,) draft tokens kept
    draft: KVCache | None  # the draft model's cache (``model``), same slot layout


# --------------------------------------------------------------------------- drafting

def ngram_drafts(tokens: jax.Array, last: jax.Array, k: int, ngram: int) -> jax.Array:
    """(B, k) drafts: after the latest earlier slot whose preceding tokens match the longest
    suffix (up to ``ngram`` tokens) ending at slot ``last`` (B,), the tokens that followed
    it. A continuation that runs into the present continues with the draft itself (a
    repeating pattern repeats). Rows without any match draft token 0 (free: the verify
    step has a fixed width)."""
    B, S = tokens.shape
    slot = jnp.arange(S)
    run = jnp.ones((B, S), bool)
    length = jnp.zeros((B, S), jnp.int32)
    for s in range(ngram):  # does the token s before candidate slot j equal the one s before last?
        shifted = jnp.pad(tokens, ((0, 0), (s, 0)), constant_values=_NO_TOKEN)[:, :S]
        want = jnp.take_along_axis(tokens, jnp.clip(last - s, 0, S - 1)[:, None], axis=1)
        run = run & (shifted == want) & (shifted != _NO_TOKEN) & (last[:, None] - s >= 0)
        length = length + run
    score = jnp.where((slot[None] < last[:, None]) & (length > 0), length * S + slot[None], -1)
    j = jnp.argmax(score, axis=1)
    found = jnp.max(score, axis=1) >= 0
    drafts = []
    for i in range(k):
        src = j + 1 + i
        past = jnp.take_along_axis(tokens, jnp.minimum(src, S - 1)[:, None], axis=1)[:, 0]
        # src > last: the pattern's continuation is the draft so far (src - last - 1 < i)
        own = jnp.stack(drafts, 1) if drafts else jnp.zeros((B, 1), jnp.int32)
        ahead = jnp.take_along_axis(own, jnp.clip(src - last - 1, 0, max(i - 1, 0))[:, None], axis=1)[:, 0]
        drafts.append(jnp.where(src <= last, past, ahead))
    d = jnp.stack(drafts, axis=1)
    return jnp.where(found[:, None] & (d != _NO_TOKEN), d, 0).astype(jnp.int32)


def _model_drafts(dcfg: ModelConfig, dparams, dcache: KVCache, state: SpecState, last, k: int, vocab: int):
    """(drafts (B, k), the draft cache): the draft model's greedy tokens from the pending
    one, one token per call. It runs k + 1 calls (the last one's token unused) so that its
    cache then holds the pending token and all k drafts: whatever the verify step keeps,
    the draft cache holds every kept token before the next pending one."""
    active = ~state.done
    S = state.tokens.shape[1]
    tok = jnp.maximum(jnp.take_along_axis(state.tokens, jnp.minimum(last, S - 1)[:, None], axis=1)[:, 0], 0)
    drafts = []
    for i in range(k + 1):
        at = last + i
        c = dcache.replace(index=at)
        out = forward(dcfg, dparams, tok[:, None], mask=active[:, None], positions=(at + state.offset)[:, None],
                      cache=c, write_first=True)
        dcache = out.cache
        tok = jnp.minimum(jnp.argmax(out.logits[:, 0], axis=-1), vocab - 1).astype(jnp.int32)
        if i < k:
            drafts.append(tok)
    return jnp.stack(drafts, axis=1), dcache


# ----------------------------------------------------------------------------- verify

def _accept_greedy(logits: jax.Array, drafts: jax.Array):
    """(drafts kept (B,), the k + 1 tokens to emit: kept drafts, then the model's own)."""
    g = jnp.argmax(logits, axis=-1).astype(jnp.int32)  # (B, k+1)
    kept = jnp.sum(jnp.cumprod(drafts == g[:, :-1], axis=1), axis=1)
    return kept, g  # g[:kept] equals the kept drafts


def _accept_sampled(logits: jax.Array, drafts: jax.Array, sampling, key: jax.Array):
    """Rejection sampling with a point-mass draft: draft d kept with probability p(d); at
    the first rejection the token comes from p without d (renormalised: the residual
    max(p - q, 0) of a point mass q), after k kept drafts from the next position's p."""

    B, K1, V = logits.shape
    x = filter_logits(logits.reshape(B * K1, V), sampling).reshape(B, K1, V)
    logp = jax.nn.log_softmax(x, axis=-1)
    p_draft = jnp.exp(jnp.take_along_axis(logp[:, :-1], drafts[..., None], axis=-1)[..., 0])  # (B, k)
    k_u, k_c = jax.random.split(key)
    keep = jax.random.uniform(k_u, p_draft.shape) < p_draft
    kept = jnp.sum(jnp.cumprod(keep, axis=1), axis=1)
    no_draft = jnp.arange(V)[None, None] == drafts[..., None]  # (B, k, V)
    resid = jnp.concatenate([jnp.where(no_draft, -jnp.inf, x[:, :-1]), x[:, -1:]], axis=1)
    own = jax.random.categorical(k_c, resid, axis=-1).astype(jnp.int32)  # (B, k+1)
    j = jnp.arange(K1)[None]
    drafts_ext = jnp.concatenate([drafts, jnp.zeros((B, 1), jnp.int32)], axis=1)
    return kept, jnp.where(j < kept[:, None], drafts_ext, own)


def _step(cfg: ModelConfig, params, dcfg, dparams, state: SpecState, eos, P, max_new, spec: Speculation,
          sampling, write_first: bool) -> SpecState:
    """One verify step for every row not done."""
    S = state.tokens.shape[1]
    k = spec.k
    active = ~state.done
    last = P + state.n - 1  # the pending token's slot
    key, k_acc = jax.random.split(state.key)
    dcache = state.draft
    if spec.method == "model":
        drafts, dcache = _model_drafts(dcfg, dparams, dcache, state, last, k, cfg.vocab_size)
    else:
        drafts = ngram_drafts(state.tokens, last, k, spec.ngram)
    pending = jnp.maximum(jnp.take_along_axis(state.tokens, jnp.minimum(last, S - 1)[:, None], axis=1), 0)
    x = jnp.concatenate([pending, drafts], axis=1)  # (B, k+1)
    positions = (last + state.offset)[:, None] + jnp.arange(k + 1)[None]
    out = forward(cfg, params, x, mask=jnp.broadcast_to(active[:, None], x.shape), positions=positions,
                  cache=state.cache.replace(index=last), write_first=write_first)
    if sampling.temperature == 0:
        kept, emit = _accept_greedy(out.logits, drafts)
    else:
        kept, emit = _accept_sampled(out.logits, drafts, sampling, k_acc)
    # a row ends at its first EOS among the emitted tokens (kept; what follows is dropped)
    j = jnp.arange(k + 1)[None]
    is_eos = jnp.isin(emit, eos) & (j <= kept[:, None])
    hit = is_eos.any(axis=1)
    count = jnp.where(hit, jnp.argmax(is_eos, axis=1) + 1, kept + 1)
    count = jnp.where(active, count, 0)
    tokens = write_rows(state.tokens, jnp.where(active[:, None], emit, _NO_TOKEN), P + state.n, 1)
    n = state.n + count
    # slots from the new pending token on hold rejected drafts (or nothing): position -1
    stale = jnp.arange(S)[None] >= (P + n - 1)[:, None]
    cache = out.cache.replace(pos=jnp.where(stale, -1, out.cache.pos))
    if dcache is not None:
        dcache = dcache.replace(pos=jnp.where(stale, -1, dcache.pos))
    return SpecState(cache=cache, tokens=tokens, n=n, offset=state.offset,
                     done=state.done | (active & (hit | (n >= max_new))), key=key,
                     steps=state.steps + active, accepted=state.accepted + jnp.maximum(count - 1, 0), draft=dcache)


def _view(state: SpecState, ran):
    """What the host reads after a call: (n, done, tokens (B, S), steps, accepted, verify
    steps run), fresh arrays (the state itself is donated to the next call)."""
    return state.n, state.done, jnp.copy(state.tokens), state.steps, state.accepted, ran


@functools.partial(jax.jit, static_argnames=("cfg", "dcfg", "spec", "sampling", "write_first"),
                   donate_argnames=("state",))
def verify_chunk(cfg: ModelConfig, params, dcfg, dparams, state: SpecState, stopped, eos, P, max_new,
                 spec: Speculation, sampling, write_first: bool = True):
    """Up to ``spec.iters`` verify steps; rows in ``stopped`` (the host's stop rule) end
    first. The call ends early once every row is done: a verify step costs a whole
    forward even when every row is masked (the call sent ahead, the last call's tail).
    ``state`` is donated. P (the first generated token's slot) and max_new are traced: one
    program per cache shape, as plain decoding's. Returns (state, view)."""
    state = state.replace(done=state.done | stopped)

    def go_on(c):
        i, s = c
        return (i < spec.iters) & ~jnp.all(s.done)

    def body(c):
        i, s = c
        return i + 1, _step(cfg, params, dcfg, dparams, s, eos, P, max_new, spec, sampling, write_first)

    ran, state = jax.lax.while_loop(go_on, body, (jnp.int32(0), state))
    return state, _view(state, ran)


@functools.partial(jax.jit, static_argnames=("sampling",), donate_argnames=("cache", "draft"))
def init_state(cache: KVCache, draft, logits, tokens, offset, key, eos, P, max_new, sampling):
    """The state after the prefill: the first token from the prompt's last logits (as plain
    decoding takes it), pending at slot P."""

    key, sub = jax.random.split(key)
    first = next_token(sub, logits, sampling)
    B = first.shape[0]
    tokens = jax.lax.dynamic_update_slice_in_dim(tokens, first[:, None], P, axis=1)
    n = jnp.ones((B,), jnp.int32)
    done = jnp.isin(first, eos) | (max_new <= 1)
    zeros = jnp.zeros((B,), jnp.int32)
    # the caches' write slot is per row from here on (set before each verify step)
    cache = cache.replace(index=jnp.full((B,), P, jnp.int32))
    if draft is not None:
        draft = draft.replace(index=jnp.full((B,), P, jnp.int32))
    state = SpecState(cache=cache, tokens=tokens, n=n, offset=offset, done=done, key=key, steps=zeros,
                      accepted=zeros, draft=draft)
    return state, _view(state, jnp.int32(0))


# ------------------------------------------------------------------------------- host

@dataclasses.dataclass
class Stats:
    """Verify steps and kept drafts, summed over rows and batches (acceptance rate)."""

    steps: int = 0  # verify steps, summed over the rows that took part
    accepted: int = 0  # draft tokens kept
    drafted: int = 0
    tokens: int = 0  # tokens generated (rows' final lengths)
    iterations: int = 0  # verify steps the device ran (forwards), summed over batches

    @property
    def acceptance(self) -> float:
        return self.accepted / self.drafted if self.drafted else 0.0

    @property
    def tokens_per_step(self) -> float:
        return (self.accepted + self.steps) / self.steps if self.steps else 0.0


_LAST = [Stats()]  # the figures of this process's last speculative generate call


def start_stats() -> None:
    """A new generate call: its figures start from zero."""
    _LAST[0] = Stats()


def last_stats() -> Stats:
    """Verify steps, kept drafts and tokens of the last speculative ``generate`` call."""
    return _LAST[0]


@dataclasses.dataclass(frozen=True)
class DraftPlan:
    """The draft model's weights and its one-row cache of the shared prefix."""

    cfg: ModelConfig
    stacked: dict
    params: dict
    dtype: object
    prefix: KVCache | None


def draft_plan(draft_model, plan) -> DraftPlan:
    from cca_jax.model.params import unstack_layers

    cfg, stacked = draft_model.config, draft_model.params()
    prefix = None
    if plan.shared:
        c = init_cache(cfg, 1, plan.size, draft_model.dtype)
        _, prefix = prefill(cfg, stacked, jnp.asarray([plan.shared_tokens], jnp.int32),
                            jnp.ones((1, plan.shared), bool), c)
    return DraftPlan(cfg, stacked, unstack_layers(stacked), draft_model.dtype, prefix)


def _draft_prefill(dp: DraftPlan, plan, toks, mask):
    rows = toks.shape[0]
    cache = tile_cache(dp.prefix, rows) if plan.shared else init_cache(dp.cfg, rows, plan.size, dp.dtype)
    _, cache = prefill(dp.cfg, dp.stacked, jnp.asarray(toks), jnp.asarray(mask), cache)
    return cache


def _buffer(plan, toks: np.ndarray, mask: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(tokens (B, S): every row's whole prompt at its slots, _NO_TOKEN elsewhere;
    offset (B,): position of slot j is j + offset)."""
    B = toks.shape[0]
    buf = np.full((B, plan.size), _NO_TOKEN, np.int32)
    if plan.shared:
        buf[:, :plan.shared] = np.asarray(plan.shared_tokens, np.int32)[None]
    buf[:, plan.shared:plan.shared + toks.shape[1]] = np.where(mask, toks, _NO_TOKEN)
    P = plan.shared + plan.suffix_len
    offset = (plan.shared + mask.sum(axis=1)) - P
    return buf, offset.astype(np.int32)


def decode_rows(plan, config, cache, logits, key, stop, n: int, toks: np.ndarray, mask: np.ndarray, draft=None):
    """``generate``'s decode loop, speculative: (tokens (rows, max_new_tokens), per row the
    stop rule's cut or None), as ``generate._decode_rows`` returns them."""

    spec = Speculation(config.speculative, config.spec_k, config.spec_ngram, config.spec_iters)
    rows, max_new, P = logits.shape[0], config.max_new_tokens, plan.shared + plan.suffix_len
    eos = np.asarray(plan.eos)
    buf, offset = _buffer(plan, toks, mask)
    dcache = _draft_prefill(draft, plan, toks, mask) if draft is not None else None
    dcfg, dparams = (draft.cfg, draft.params) if draft is not None else (None, None)
    key, sub = jax.random.split(key)
    P_, max_new_ = jnp.int32(P), jnp.int32(max_new)
    state, view = init_state(cache, dcache, logits, jnp.asarray(buf), jnp.asarray(offset), sub, plan.eos, P_,
                             max_new_, config.sampling)
    stopped, keep = np.zeros(rows, bool), [None] * rows

    def launch(state):
        return verify_chunk(plan.cfg, plan.params, dcfg, dparams, state, jnp.asarray(stopped), plan.eos, P_, max_new_,
                            spec, config.sampling, config.write_first)

    def read(view):
        # on the host; on a multi-host mesh gathered from every process's devices
        n_, done, toks_, steps, acc, ran = timing.fetch(tuple(view))
        # what plain decoding could have produced: the budget's first max_new tokens
        # (a verify step may overshoot it by up to k; the stop rule never sees those)
        n_ = np.minimum(n_, max_new)
        out = np.where(np.arange(max_new)[None] < n_[:, None], toks_[:, P:P + max_new], config.pad_token_id)
        if stop is not None:
            check_stops(stop, [r[:c] for r, c in zip(out, n_)], stopped, keep, n, eos)
        return out, (done | stopped)[:n].all(), (done | stopped)[:n].any(), (n_, steps, acc), int(ran)

    out, finished, any_done, figures, ran = read(view)
    # every step adds at least one token per row: max_new - 1 steps end every row
    calls = -(-(max_new - 1) // spec.iters)
    pending = None if finished else launch(state)
    sent = 0 if pending is None else 1
    while pending is not None:
        state, view = pending
        pending = None
        # as generate's decode chunks: while no row has finished, the next call goes out
        # before this one's tokens are read (if this one ends every row, that call
        # stops before its first step)
        if config.ahead and not any_done and sent < calls:
            pending, sent = launch(state), sent + 1
        out, finished, any_done, figures, r = read(view)
        ran += r
        if finished:
            break
        if pending is None and sent < calls:
            pending, sent = launch(state), sent + 1
    n_, steps, acc = figures
    stats = _LAST[0]
    stats.steps += int(steps[:n].sum())
    stats.accepted += int(acc[:n].sum())
    stats.drafted += int(steps[:n].sum()) * spec.k
    stats.tokens += int(n_[:n].sum())
    stats.iterations += ran
    return out, keep
