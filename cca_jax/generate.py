"""Batched generation: prefill, then a compiled decode loop over a static-shape KV cache.

``generate`` takes token-id lists and returns the generated token ids exactly as
generated (never decoded and re-tokenized). Prompts of different lengths share a batch
through left padding. When every prompt starts with the same context (a few-shot
prompt), that context is encoded once and its cache reused for every batch.

The decode loop runs ``chunk`` steps per compiled call; between calls the host checks the
per-sequence stop rule (e.g. "the answer sentence is complete") on the tokens so far and
ends finished rows, so a batch stops as soon as all its rows have stopped. The next chunk
is sent before the last one's tokens are read, so the device never waits for the host
between chunks (one chunk is wasted, the one sent after the last row finished).
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from cca_jax import mesh as mesh_lib
from cca_jax import timing
from cca_jax.config import ModelConfig
from cca_jax.errors import CCAError
from cca_jax.model.cache import KVCache, grow_cache, init_cache, tile_cache
from cca_jax.model.prefill import left_pad, prefill
from cca_jax.model.transformer import forward
# Sampling and filter_logits stay importable from here (their home is sampling.py)
from cca_jax.sampling import Sampling, StopRule, check_stops, filter_logits, next_token, row_tokens  # noqa: F401

@functools.partial(jax.jit, static_argnames=("cfg", "steps", "sampling", "write_first"), donate_argnames=("cache",))
def decode_chunk(cfg: ModelConfig, params, cache: KVCache, logits, done, key, eos, pad, steps: int, sampling: Sampling,
                 write_first: bool = True):
    """``steps`` decode steps from the last ``logits`` (B, V). Finished rows (``done``, or
    an ``eos`` token emitted) emit ``pad`` and are masked out of the cache. ``cache`` is
    donated. write_first: each step writes its keys/values before attending (one
    softmax over the buffer: fewer kernels per layer than reading it as a constant).
    Returns (cache, logits, done, key, tokens (B, steps))."""

    def step(carry, _):
        cache, logits, done, key = carry
        key, sub = jax.random.split(key)
        tok = next_token(sub, logits, sampling)
        tok = jnp.where(done, pad, tok)
        emitted_done = done
        done = done | jnp.isin(tok, eos)
        out = forward(cfg, params, tok[:, None], mask=~emitted_done[:, None], cache=cache,
                      at=jnp.zeros((tok.shape[0], 1), jnp.int32), write_first=write_first)
        return (out.cache, out.logits[:, 0], done, key), tok

    (cache, logits, done, key), toks = jax.lax.scan(step, (cache, logits, done, key), None, length=steps)
    return cache, logits, done, key, toks.T


SUFFIX_BUCKET = 64  # prompt tokens after the shared prefix, rounded up to a multiple of this


def _bucket(n: int, m: int) -> int:
    return max(m, -(-n // m) * m)


def common_prefix_len(prompts: Sequence[Sequence[int]]) -> int:
    """Length of the token prefix shared by all prompts, leaving each at least one token."""
    first = prompts[0]
    n = min(len(p) for p in prompts) - 1
    for p in prompts[1:]:
        k = 0
        while k < n and p[k] == first[k]:
            k += 1
        n = k
    return max(n, 0)


def stop_ids(model, tokenizer=None) -> list[int]:
    """EOS ids of the model config and the tokenizer together."""
    eos = model.config.eos_token_id
    ids = set([eos] if isinstance(eos, int) else list(eos or ()))
    if tokenizer is not None and tokenizer.eos_token_id is not None:
        ids.add(tokenizer.eos_token_id)
    return sorted(ids)


def _eos_ids(model, eos) -> np.ndarray:
    if eos is None:
        eos = model.config.eos_token_id
    if eos is None:
        eos = ()
    ids = [eos] if isinstance(eos, int) else list(eos)
    return np.asarray(ids or [-1], np.int32)


@dataclasses.dataclass(frozen=True)
class GenerationConfig:
    """How ``generate`` runs: everything but the prompts, the stop rule and the PRNG key."""

    max_new_tokens: int
    sampling: Sampling = Sampling()
    eos_token_id: int | Sequence[int] | None = None  # None: the model config's; [] = none
    pad_token_id: int = 0
    batch_size: int = 32
    # every batch padded to batch_size rows, a lone one too (one program for calls of any
    # size: the rounds of pivot sampling, whose pending items shrink)
    fixed_rows: bool = False
    chunk: int = 32  # decode steps per compiled call
    share_prefix: bool = True  # encode a context every prompt starts with once
    min_shared_prefix: int = 8  # ... when it is at least this many tokens
    # a shared prefix at least this long is cut to a multiple of it (the rest is prefilled
    # with each row): calls whose contexts differ in length (pivot sampling, one call per
    # item) then reuse compiled programs instead of compiling new shapes for each
    shared_bucket: int = 32
    write_first: bool = True  # decode steps write keys/values before attending (decode_chunk)
    # send the next decode chunk before reading the last one's tokens, so the device never
    # waits for the host between chunks (the one sent after the last row finished is wasted)
    ahead: bool = True
    # exact speculative decoding (cca_jax/speculative.py): off | ngram (drafts from the
    # row's own prompt and output) | model (drafts from draft_model, same tokenizer)
    speculative: str = "off"
    spec_k: int = 4  # draft tokens per verify step
    spec_ngram: int = 3  # longest suffix the n-gram lookup matches
    spec_iters: int = 8  # verify steps per compiled call
    draft_model: object = None  # a loaded model (speculative: model)

    @classmethod
    def of(cls, max_new_tokens: int, temperature: float = 0.0, top_k: int | None = None,
           top_p: float | None = None, **options) -> "GenerationConfig":
        """A config from ``generate``'s keyword arguments (the sampling ones flat)."""
        return cls(max_new_tokens, Sampling(temperature, top_k, top_p), **options)


@dataclasses.dataclass(frozen=True)
class _Plan:
    """What every batch of one ``generate`` call shares. The cache layout of each batch:
    [shared prefix | left-padded suffixes | new tokens]."""

    cfg: ModelConfig
    stacked: dict  # stacked weights: prefills run one scanned block
    params: dict  # per-layer weights: the memory-bound decode steps (see unstack_layers)
    dtype: object
    eos: jax.Array
    shared: int  # prefix length encoded once (0: none)
    shared_tokens: tuple  # those tokens
    suffix_len: int
    size: int  # cache slots
    prefix: KVCache | None  # the shared prefix's one-row cache


def _layout(prompts, config: GenerationConfig) -> tuple[int, int, int]:
    """(shared prefix length, suffix length, cache slots) of a call: its programs' shapes."""
    shared = common_prefix_len(prompts) if config.share_prefix and len(prompts) > 1 else 0
    if shared >= config.shared_bucket > 0:
        shared -= shared % config.shared_bucket
    if shared < config.min_shared_prefix:
        shared = 0
    # coarse: the train, val and test splits' suffixes then share one prefill program
    suffix_len = _bucket(max(len(p) - shared for p in prompts), SUFFIX_BUCKET)
    # room for whole decode chunks: the last one runs a full chunk too (see _launch)
    size = _bucket(shared + suffix_len + _bucket(config.max_new_tokens, config.chunk), 128)
    return shared, suffix_len, size


def _batch_rows(n: int, config: GenerationConfig, many: bool) -> int:
    """Rows of a batch of ``n`` prompts: padded rows (copies of the last; dropped after)
    keep the compiled shapes few: every batch of a long call (``many``) or of fixed rows
    has batch_size rows, a lone batch a power of two (calls of 22, 23, 24 and 30 prompts
    share one program; decoding is bound by reading the weights, so extra rows cost little)."""
    return config.batch_size if many else min(config.batch_size, 1 << (n - 1).bit_length())


def _plan(model, prompts, config: GenerationConfig) -> _Plan:
    cfg, stacked = model.config, model.params()
    params = mesh_lib.per_layer(stacked)  # unstack_layers; unmerged when heads are split over devices
    eos = jnp.asarray(_eos_ids(model, config.eos_token_id))
    shared, suffix_len, size = _layout(prompts, config)
    prefix = None
    if shared:
        # sized for the prefix alone (grown for each batch): one program for any budget
        c = init_cache(cfg, 1, shared, model.dtype, mesh_lib.cache_sharding(stacked, 1, cfg.num_kv_heads))
        _, prefix = prefill(cfg, stacked, jnp.asarray([prompts[0][:shared]], jnp.int32), jnp.ones((1, shared), bool), c)
    return _Plan(cfg, stacked, params, model.dtype, eos, shared, tuple(prompts[0][:shared]), suffix_len, size, prefix)


def _launch(plan: _Plan, config: GenerationConfig, state, stopped: np.ndarray, sent: int):
    """Send the next decode chunk: (its pending outputs, decode steps sent so far). Every
    chunk has ``chunk`` steps, the last too (its steps past the budget are dropped): one
    decode program per batch shape, not a second one for a budget's remainder (1500 new
    tokens in chunks of 32 would end with 28) once some row runs to the budget."""
    cache, logits, done, key = state
    steps = config.chunk
    if stopped.any():  # rows the stop rule ended
        done = done | jnp.asarray(stopped)
    s = config.sampling
    kind = (f"decode_chunk {logits.shape[0]}x{plan.size} "
            + ("greedy" if s.temperature == 0 else f"T={s.temperature:g} top_k={s.top_k} top_p={s.top_p}")
            + f" {steps} steps")
    out = timing.step(kind, decode_chunk, plan.cfg, plan.params, cache, logits, done, key, plan.eos,
                      config.pad_token_id, steps, config.sampling, config.write_first)
    return out, sent + steps


def _decode_rows(plan: _Plan, config: GenerationConfig, cache, logits, key, stop: StopRule | None, n: int):
    """Decode chunks until the first ``n`` rows have all finished or the budget is spent:
    (tokens (rows, <= max_new_tokens), per row the stop rule's cut or None)."""
    rows, eos = logits.shape[0], np.asarray(plan.eos)
    out, stopped, keep = np.zeros((rows, 0), np.int32), np.zeros(rows, bool), [None] * rows
    pending, sent = _launch(plan, config, (cache, logits, jnp.zeros((rows,), bool), key), stopped, 0)
    while pending is not None:
        *state, new = pending
        pending = None
        # the next chunk is sent before this one's tokens are read, so the device never
        # waits for the host's stop checks; only the chunk sent after the last row has
        # finished is wasted (rows finished meanwhile emit tokens that are cut off)
        if config.ahead and sent < config.max_new_tokens:
            pending, sent = _launch(plan, config, state, stopped, sent)
        # the tokens so far (gathered from every process's devices on a multi-host mesh)
        new, done_host = timing.fetch((new, state[2]))
        out = np.concatenate([out, new], axis=1)[:, :config.max_new_tokens]  # the last chunk's overrun dropped
        if stop is not None:
            check_stops(stop, out, stopped, keep, n, eos)
        finished = done_host | stopped
        if finished[:n].all():
            break
        if pending is None and sent < config.max_new_tokens:
            pending, sent = _launch(plan, config, state, stopped, sent)
    return out, keep


def _generate_batch(plan: _Plan, config: GenerationConfig, prompts, pad_rows: bool, key, stop,
                    draft=None) -> list[list[int]]:
    """One batch: prefill its suffixes on the shared prefix, decode, cut each row."""
    rows = [p[plan.shared:] for p in prompts]
    n = len(rows)
    rows = rows + [rows[-1]] * (_batch_rows(n, config, pad_rows) - n)
    # on a mesh, whole rows per device: padded to a multiple of the data axis (the rows
    # already there draw the same random numbers: they depend on the row, not the count)
    rows = rows + [rows[-1]] * (mesh_lib.padded_rows(plan.stacked, len(rows)) - len(rows))
    toks, mask = left_pad(rows, plan.suffix_len, config.pad_token_id)
    # on a mesh: rows over the data axis, the cache laid out like the weights (mesh.py)
    cs = mesh_lib.cache_sharding(plan.stacked, len(rows), plan.cfg.num_kv_heads)
    # the prompts are prefilled into a cache of their own length, then it grows to the
    # decode budget's: the prefill programs are the same for every budget (train, test)
    prompt_slots = plan.shared + plan.suffix_len
    cache = (tile_cache(plan.prefix, len(rows), cs, prompt_slots) if plan.shared
             else init_cache(plan.cfg, len(rows), prompt_slots, plan.dtype, cs))
    kind = f"prefill {len(rows)}x{plan.suffix_len}" + (f" after a shared {plan.shared}" if plan.shared else "")
    logits, cache = timing.step(kind, prefill, plan.cfg, plan.stacked, mesh_lib.rows(toks, plan.stacked),
                                mesh_lib.rows(mask, plan.stacked), cache)
    cache = grow_cache(cache, plan.size, cs)
    if config.speculative != "off":
        from cca_jax import speculative

        out, keep = speculative.decode_rows(plan, config, cache, logits, key, stop, n, toks, mask, draft)
    else:
        out, keep = _decode_rows(plan, config, cache, logits, key, stop, n)
    seqs = [row_tokens(out[r], np.asarray(plan.eos)) for r in range(n)]
    return [seq[:k] if k is not None else seq for seq, k in zip(seqs, keep)]


def _check_request(prompts, config: GenerationConfig, key) -> None:
    if any(len(p) == 0 for p in prompts):
        raise CCAError("every prompt needs at least one token")
    if config.max_new_tokens < 1:
        raise CCAError(f"max_new_tokens must be >= 1, got {config.max_new_tokens}")
    if config.sampling.temperature > 0 and key is None:
        raise CCAError("sampling (temperature > 0) needs an explicit PRNG key: key=jax.random.key(seed)")
    if config.speculative != "off" or config.draft_model is not None:
        from cca_jax import speculative

        speculative.check(config.speculative, config.spec_k, config.spec_ngram, config.spec_iters,
                          config.draft_model)


def generate(model, prompts: Sequence[Sequence[int]], max_new_tokens: int, *, stop: StopRule | None = None,
             key: jax.Array | None = None, progress: bool = False,
             on_batch: Callable[[list[int], list[list[int]]], None] | None = None, **options) -> list[list[int]]:
    """Generate up to ``max_new_tokens`` for each prompt (lists of token ids).

    ``options`` are ``GenerationConfig``'s fields (eos_token_id, pad_token_id, batch_size,
    fixed_rows, chunk, share_prefix, min_shared_prefix, shared_bucket, write_first, ahead; speculative, spec_k,
    spec_ngram, spec_iters, draft_model) and the sampling ones (temperature (0 = greedy),
    top_k, top_p). See ``generate_with``."""
    config = GenerationConfig.of(max_new_tokens, **options)
    return generate_with(model, prompts, config, stop=stop, key=key, progress=progress, on_batch=on_batch)


def generate_with(model, prompts: Sequence[Sequence[int]], config: GenerationConfig, *, stop: StopRule | None = None,
                  key: jax.Array | None = None, progress: bool = False,
                  on_batch: Callable[[list[int], list[list[int]]], None] | None = None) -> list[list[int]]:
    """Generate for each prompt as ``config`` says.

    Rows end at an EOS token (kept, as transformers does), when ``stop`` says so (cut to
    what it keeps), or at ``max_new_tokens``. Sampling with a fixed ``key`` is reproducible
    for the same prompts and batch size. Returns the generated ids per prompt, in order.
    ``on_batch(indices, outputs)`` is called as each batch finishes (progress, scoring).
    """
    if not prompts:
        return []
    _check_request(prompts, config, key)
    key = key if key is not None else jax.random.key(0)
    wait_for_warm(model, prompts, config)
    plan = _plan(model, prompts, config)
    draft = None
    if config.speculative != "off":
        from cca_jax import speculative

        speculative.start_stats()
        if config.speculative == "model":
            draft = speculative.draft_plan(config.draft_model, plan)
    order = sorted(range(len(prompts)), key=lambda i: -len(prompts[i]))  # less padding per batch
    results: list[list[int] | None] = [None] * len(prompts)
    bar = None
    if progress:
        from tqdm.auto import tqdm

        bar = tqdm(total=len(prompts), desc="generate", unit="seq")
    for b0 in range(0, len(order), config.batch_size):
        idx = order[b0:b0 + config.batch_size]
        key, batch_key = jax.random.split(key)
        outs = _generate_batch(plan, config, [prompts[i] for i in idx], config.fixed_rows or len(order) > config.batch_size,
                               batch_key, stop,
                               draft)
        for i, seq in zip(idx, outs):
            results[i] = seq
        if on_batch is not None:
            on_batch(list(idx), outs)
        if bar is not None:
            bar.update(len(idx))
    if bar is not None:
        bar.close()
    return results  # type: ignore[return-value]


def warm(model, prompts: Sequence[Sequence[int]], max_new_tokens: int, **options):
    """Compile, on a background thread, the prefill and decode programs that
    ``generate(model, prompts, max_new_tokens, **options)`` will run, while the device
    works on something else; started thread, or None where nothing is warmed.

    The call finds the programs ready: JAX keeps what ``lower(...).compile()`` built for
    the jitted function's later calls, and the persistent compilation cache holds them too
    where it is on (``timing.compile_ahead``). Not on a device mesh or with speculative
    decoding (their layouts are not worked out here)."""
    config = GenerationConfig.of(max_new_tokens, **options)
    stacked = model.params()
    if not prompts or config.speculative != "off" or mesh_lib.mesh_of(stacked) is not None:
        return None
    prompts = [list(p) for p in prompts]
    sig = _signature(model, prompts, config)
    if sig in _WARMING:
        return _WARMING[sig]
    _WARMING[sig] = timing.compile_ahead(_warm_specs(model, prompts, config))
    return _WARMING[sig]


# the calls being warmed, by their programs' signature: a call waits for its own (the rest
# of a compile already under way) instead of compiling the same programs a second time
_WARMING: dict = {}


def _first_rows(n: int, config: GenerationConfig) -> int:
    return _batch_rows(min(n, config.batch_size), config, config.fixed_rows or n > config.batch_size)


def _signature(model, prompts, config: GenerationConfig) -> tuple:
    """What a call's prefill and decode programs depend on (besides the weights' shapes)."""
    return (model.config, str(model.dtype), _layout(prompts, config), _first_rows(len(prompts), config),
            config.sampling, config.chunk, config.write_first, len(_eos_ids(model, config.eos_token_id)))


def wait_for_warm(model, prompts, config: GenerationConfig) -> None:
    """Wait for a background compile of this call's programs, if one is under way."""
    if _WARMING:
        thread = _WARMING.pop(_signature(model, prompts, config), None)
        if thread is not None:
            thread.join()


def _warm_specs(model, prompts, config: GenerationConfig) -> list:
    """(jitted function, arguments) of a call's batch prefill and decode chunk, abstract
    where the call makes them: the avals ``_generate_batch`` and ``_launch`` pass."""
    cfg, stacked = model.config, model.params()
    shared, suffix_len, size = _layout(prompts, config)
    rows = _first_rows(len(prompts), config)
    dt = model.dtype
    sds = jax.ShapeDtypeStruct

    def cache(slots, empty):
        kv = sds((rows, cfg.num_kv_heads, slots, cfg.head_dim), dt)
        return KVCache(k=(kv,) * cfg.num_layers, v=(kv,) * cfg.num_layers, pos=sds((rows, slots), jnp.int32),
                       index=sds((), jnp.int32), empty=empty)

    toks = sds((rows, suffix_len), jnp.int32)
    prefill_args = (cfg, stacked, toks, sds((rows, suffix_len), jnp.bool_), cache(shared + suffix_len, not shared))
    layers = jax.eval_shape(mesh_lib.per_layer, stacked)
    eos = sds((len(_eos_ids(model, config.eos_token_id)),), jnp.int32)
    key = jax.eval_shape(lambda: jax.random.split(jax.random.key(0))[1])
    decode_args = (cfg, layers, cache(size, False), sds((rows, cfg.vocab_size), jnp.float32), sds((rows,), jnp.bool_),
                   key, eos, sds((), jnp.int32, weak_type=True), config.chunk, config.sampling, config.write_first)
    return [(prefill, prefill_args), (decode_chunk, decode_args)]

