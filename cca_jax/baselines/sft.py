"""Supervised fine-tuning baselines (SPEC 5): full and LoRA, on the CCA train split.

A training example is the exact evaluation prompt (``data/prompt.encode`` with the run's
shots / chat setting) followed by the gold answer as a chain of thought in the format the
answer extractor reads ("<solution> The final answer is N."), then the tokenizer's EOS
(a stop token of generation). The loss is the mean token cross-entropy over the answer
tokens only: prompt tokens and padding have weight 0, and the logits are computed only
at the positions that predict answer tokens.

Everything here is a pure function of parameter pytrees. Trained values live in float32
masters (full: every parameter; LoRA: the adapters); the forward pass runs in the model's
working dtype, as in ``cca/amplify.py``.
"""

from __future__ import annotations

import dataclasses
import math
import re
from typing import NamedTuple, Sequence

import jax
import jax.numpy as jnp
import numpy as np
import optax

from cca_jax import timing, validate
from cca_jax.baselines import lora as lora_lib
from cca_jax.config import ModelConfig
from cca_jax.data.prompt import encode
from cca_jax.errors import CCAError
from cca_jax.model.transformer import forward

METHODS = ("sft_full", "sft_lora")
OPTIMIZERS = ("adamw", "adam", "sgd")
SCHEDULES = ("cosine", "linear", "constant")


@dataclasses.dataclass(frozen=True)
class SFTConfig:
    lr: float = 1e-5
    optimizer: str = "adamw"  # adamw | adam | sgd
    weight_decay: float = 0.01  # adamw only; norms and biases are not decayed (HF Trainer's rule)
    clip: float | None = 1.0  # global-norm clip; null or 0: none
    schedule: str = "cosine"  # cosine (to 0 at `steps`) | linear | constant
    warmup: int = 0  # linear warmup steps
    steps: int = 50
    batch_size: int = 8
    micro_batch_size: int | None = None  # gradient accumulation; None: the whole batch at once
    eval_steps: int | tuple[int, ...] = 5  # an interval, or a list of steps (the last step always)
    lora_r: int = 16
    lora_alpha: float = 32.0
    lora_dropout: float = 0.1
    lora_targets: tuple[str, ...] = lora_lib.DEFAULT_TARGETS
    append_eos: bool = True  # end each answer with the tokenizer's EOS so generation stops there
    remat: bool = False
    seed: int = 0

    def __post_init__(self):
        v = validate
        v.check_fields(self, "sft", {
            "lr": v.above(0), "optimizer": v.one_of(*OPTIMIZERS), "weight_decay": v.at_least(0),
            "clip": v.at_least(0), "schedule": v.one_of(*SCHEDULES), "warmup": v.at_least(0), "steps": v.COUNT,
            "batch_size": v.COUNT, "micro_batch_size": v.COUNT, "eval_steps": v.COUNT, "lora_r": v.COUNT,
            "lora_alpha": v.above(0), "lora_dropout": (v.at_least(0), v.below(1)), "seed": v.SEED})
        # what relates two fields
        if self.warmup >= self.steps and self.schedule != "constant":
            raise CCAError(f"sft.warmup ({self.warmup}) must be below sft.steps ({self.steps})")
        if self.micro_batch_size is not None and self.batch_size % self.micro_batch_size:
            raise CCAError(f"sft.micro_batch_size must divide sft.batch_size={self.batch_size}, "
                           f"got {self.micro_batch_size}")
        lora_lib.check_targets(self.lora_targets)

    @property
    def lora_scale(self) -> float:
        return self.lora_alpha / self.lora_r

    def is_eval_step(self, step: int) -> bool:
        if step == self.steps:
            return True
        if isinstance(self.eval_steps, int):
            return step % self.eval_steps == 0
        return step in self.eval_steps


def check_method(method: str) -> str:
    if method not in METHODS:
        raise CCAError(f"not an SFT method: {method!r} (use one of {', '.join(METHODS)})")
    return method


# -- data -------------------------------------------------------------------------------------

_CALC = re.compile(r"<<[^>]*>>")


def _number(x: float) -> str:
    return str(int(x)) if float(x).is_integer() else repr(float(x))


def answer_text(item) -> str:
    """The gold chain of thought: the item's solution (GSM8K calculator annotations
    removed, lines joined) and "The final answer is N."; just the last sentence when the
    item has no solution text."""
    sol = item.answer_text.split("####")[0] if item.answer_text else ""
    sol = " ".join(line.strip() for line in _CALC.sub("", sol).splitlines() if line.strip())
    final = f"The final answer is {_number(item.answer)}."
    if not sol:
        return final
    if sol[-1] not in ".!?":
        sol += "."
    return f"{sol} {final}"


@dataclasses.dataclass(frozen=True)
class Example:
    template: int
    instance: int
    prompt: tuple[int, ...]  # exactly what evaluation feeds the model
    answer: tuple[int, ...]  # the trained continuation

    @property
    def tokens(self) -> tuple[int, ...]:
        return self.prompt + self.answer


def build_examples(tokenizer, items: Sequence, n_shots: int = 8, chat_template: bool = False,
                   append_eos: bool = True) -> list[Example]:
    """Prompt ids from ``prompt.encode`` (identical to evaluation) + the answer's ids."""
    out = []
    for it in items:
        prompt = encode(tokenizer, it.question, n_shots, chat_template)
        # the plain prompt ends "A: Let's think step by step." and the answer continues the
        # line; in a chat template the assistant turn starts on its own
        text = answer_text(it) if chat_template else " " + answer_text(it)
        ans = list(tokenizer(text, add_special_tokens=False)["input_ids"])
        if append_eos and tokenizer.eos_token_id is not None:
            ans.append(int(tokenizer.eos_token_id))
        out.append(Example(it.template, it.instance, tuple(int(t) for t in prompt), tuple(int(t) for t in ans)))
    return out


class Batch(NamedTuple):
    """Right-padded examples. ``labels[t]`` is the token after position t; ``weights[t]``
    is 1 where that token belongs to the answer. ``at`` (B, P) lists each row's answer-
    predicting positions (``at_valid`` False on padding entries)."""

    tokens: np.ndarray  # (B, T) int32
    mask: np.ndarray  # (B, T) bool
    labels: np.ndarray  # (B, T) int32
    weights: np.ndarray  # (B, T) float32
    at: np.ndarray  # (B, P) int32
    at_valid: np.ndarray  # (B, P) bool


def _round_up(n: int, k: int) -> int:
    return int(math.ceil(n / k) * k)


def shapes(examples: Sequence[Example], bucket: int = 8) -> tuple[int, int]:
    """(T, P): one padded length for every batch, so the step compiles once."""
    T = _round_up(max(len(e.tokens) for e in examples), bucket)
    P = _round_up(max(len(e.answer) for e in examples), bucket)
    return T, P


def collate(examples: Sequence[Example], length: int, n_answer: int, pad: int = 0) -> Batch:
    B = len(examples)
    tokens = np.full((B, length), pad, np.int32)
    mask = np.zeros((B, length), bool)
    labels = np.full((B, length), pad, np.int32)
    weights = np.zeros((B, length), np.float32)
    at = np.zeros((B, n_answer), np.int32)
    at_valid = np.zeros((B, n_answer), bool)
    for i, e in enumerate(examples):
        seq, n_p, n_a = e.tokens, len(e.prompt), len(e.answer)
        if len(seq) > length or n_a > n_answer:
            raise ValueError(f"example of {len(seq)} tokens ({n_a} answer) exceeds ({length}, {n_answer})")
        tokens[i, :len(seq)] = seq
        mask[i, :len(seq)] = True
        labels[i, :len(seq) - 1] = seq[1:]
        weights[i, n_p - 1:len(seq) - 1] = 1.0
        at[i, :n_a] = np.arange(n_p - 1, len(seq) - 1)
        at_valid[i, :n_a] = True
    return Batch(tokens, mask, labels, weights, at, at_valid)


def batch_indices(n: int, batch_size: int, step: int, seed: int) -> np.ndarray:
    """Example indices of step ``step`` (0-based): consecutive slices of a stream of
    per-epoch permutations, a function of (seed, step) only, so a resumed run sees the
    same batches."""
    pos = np.arange(step * batch_size, (step + 1) * batch_size)
    epochs = pos // n
    out = np.empty(batch_size, np.int64)
    for e in np.unique(epochs):
        perm = np.asarray(jax.random.permutation(jax.random.fold_in(jax.random.PRNGKey(seed), int(e)), n))
        sel = epochs == e
        out[sel] = perm[pos[sel] % n]
    return out


def step_batch(examples: Sequence[Example], config: SFTConfig, step: int, T: int, P: int, pad: int) -> Batch:
    """The batch of step ``step`` reshaped to (micro-batches, micro, ...)."""
    idx = batch_indices(len(examples), config.batch_size, step, config.seed)
    b = collate([examples[i] for i in idx], T, P, pad)
    mb = config.micro_batch_size or config.batch_size
    n = config.batch_size // mb
    return Batch(*(x.reshape(n, mb, *x.shape[1:]) for x in b))


# -- loss -------------------------------------------------------------------------------------

def token_loss(logits: jax.Array, labels: jax.Array, weights: jax.Array) -> tuple[jax.Array, jax.Array]:
    """(sum of weighted token cross-entropies, sum of weights); logits (..., V)."""
    lg = logits.astype(jnp.float32)
    ce = jax.nn.logsumexp(lg, axis=-1) - jnp.take_along_axis(lg, labels[..., None], axis=-1)[..., 0]
    return jnp.sum(ce * weights), jnp.sum(weights)


def loss_sum(params, cfg: ModelConfig, batch: Batch, remat: bool = False) -> tuple[jax.Array, jax.Array]:
    """Answer-token cross-entropy (sum, count) of one (micro-)batch; logits only at ``at``."""
    out = forward(cfg, params, jnp.asarray(batch.tokens), mask=jnp.asarray(batch.mask), at=jnp.asarray(batch.at),
                  remat=remat)
    labels = jnp.take_along_axis(jnp.asarray(batch.labels), batch.at, axis=1)
    w = jnp.take_along_axis(jnp.asarray(batch.weights), batch.at, axis=1) * batch.at_valid
    return token_loss(out.logits, labels, w)


def mean_loss(params, cfg: ModelConfig, batch: Batch, remat: bool = False) -> jax.Array:
    s, n = loss_sum(params, cfg, batch, remat)
    return s / jnp.maximum(n, 1.0)


# -- parameters -------------------------------------------------------------------------------

def _no_decay(path) -> bool:
    name = str(getattr(path[-1], "key", path[-1]))
    return name.endswith("norm") or name.endswith("_bias")


def decay_mask(tree):
    """Weight decay on weight matrices and embeddings, not on norms or biases."""
    return jax.tree_util.tree_map_with_path(lambda p, _: not _no_decay(p), tree)


def schedule(config: SFTConfig) -> optax.Schedule:
    lr, w, n = config.lr, config.warmup, config.steps
    if config.schedule == "constant":
        return optax.join_schedules([optax.linear_schedule(0.0, lr, w), optax.constant_schedule(lr)], [w]) \
            if w else optax.constant_schedule(lr)
    if config.schedule == "cosine":
        return optax.warmup_cosine_decay_schedule(0.0, lr, w, n, 0.0)
    return optax.join_schedules([optax.linear_schedule(0.0, lr, w), optax.linear_schedule(lr, 0.0, n - w)], [w])


def make_optimizer(config: SFTConfig, master) -> optax.GradientTransformation:
    sched = schedule(config)
    if config.optimizer == "adamw":
        opt = optax.adamw(sched, weight_decay=config.weight_decay, mask=decay_mask(master))
    elif config.optimizer == "adam":
        opt = optax.adam(sched)
    else:
        opt = optax.sgd(sched)
    return optax.chain(optax.clip_by_global_norm(config.clip), opt) if config.clip else opt


def init_state(method: str, params, config: SFTConfig):
    """(master, opt_state, frozen, optimizer). Full: the master is every parameter (float32
    copies), nothing frozen; LoRA: the master is the adapters, the frozen tree is the
    model's parameters."""
    check_method(method)
    if method == "sft_full":
        # a copy even for float32 weights: the step donates the master's buffers
        master, frozen = jax.tree.map(lambda x: jnp.array(x, jnp.float32, copy=True), params), None
    else:
        key = jax.random.fold_in(jax.random.PRNGKey(config.seed), 1)
        master, frozen = lora_lib.init(params, config.lora_targets, config.lora_r, key), params
    opt = make_optimizer(config, master)
    return master, opt.init(master), frozen, opt


def effective_params(method: str, master, frozen, dtype, config: SFTConfig, key: jax.Array | None = None):
    """The model's parameters in the working dtype (LoRA merged; dropout with ``key``)."""
    if method == "sft_full":
        return jax.tree.map(lambda x: x.astype(dtype), master)
    return lora_lib.apply(frozen, master, config.lora_scale, dropout=config.lora_dropout if key is not None else 0.0,
                          key=key)


def working_params(method: str, master, frozen, dtype, config: SFTConfig):
    """Weights to evaluate and export (no dropout)."""
    return effective_params(method, master, frozen, dtype, config)


def dropout_key(config: SFTConfig, step: int) -> jax.Array:
    return jax.random.fold_in(jax.random.fold_in(jax.random.PRNGKey(config.seed), 2), step)


def make_step(method: str, config: SFTConfig, cfg: ModelConfig, optimizer, dtype):
    """A jitted ``step(master, opt_state, frozen, batch, key) -> (master, opt_state, loss,
    grad_norm)``; ``batch`` arrays are (micro-batches, micro, ...): the gradient is the
    mean over every answer token of the whole batch (accumulated in float32)."""
    use_key = method == "sft_lora" and config.lora_dropout > 0

    def micro(master, frozen, b, key):
        params = effective_params(method, master, frozen, dtype, config, key if use_key else None)
        return loss_sum(params, cfg, b, config.remat)

    grad_fn = jax.value_and_grad(micro, has_aux=True)

    def step(master, opt_state, frozen, batch: Batch, key):
        zeros = jax.tree.map(jnp.zeros_like, master)

        def body(carry, xs):
            g_acc, s_acc, n_acc = carry
            b, i = xs
            (s, n), g = grad_fn(master, frozen, b, jax.random.fold_in(key, i))
            return (jax.tree.map(lambda a, x: a + x.astype(jnp.float32), g_acc, g), s_acc + s, n_acc + n), None

        n_micro = batch.tokens.shape[0]
        (g, s, n), _ = jax.lax.scan(body, (zeros, jnp.float32(0), jnp.float32(0)),
                                    (batch, jnp.arange(n_micro)))
        n = jnp.maximum(n, 1.0)
        g = jax.tree.map(lambda x: x / n, g)
        upd, opt_state = optimizer.update(g, opt_state, master)
        return optax.apply_updates(master, upd), opt_state, s / n, optax.tree.norm(g)

    # the old master and optimizer state are dead after a step: let XLA reuse their memory
    # (CPU does not support donation and would warn)
    return jax.jit(step, donate_argnums=(0, 1) if jax.default_backend() != "cpu" else ())


def to_device(batch: Batch, params=None) -> Batch:
    """The batch on the devices; with ``params`` on a mesh, each micro-batch's rows (axis
    1) over the data axis of their layout (``cca_jax.mesh``)."""
    if params is None:
        return Batch(*(jnp.asarray(x) for x in batch))
    from cca_jax import mesh as mesh_lib

    return Batch(*(mesh_lib.rows(x, params, axis=1) for x in batch))


def trainable_parameters(method: str, master) -> int:
    return int(sum(x.size for x in jax.tree.leaves(master)))


def fraction_parameters_changed(method: str, params, config: SFTConfig) -> float:
    """Full: 1.0; LoRA: the targeted leaves' size over all parameters (what merging changes)."""
    total = sum(int(x.size) for x in jax.tree.leaves(params))
    if method == "sft_full":
        return 1.0
    return lora_lib.target_parameters(params, config.lora_targets) / total


class FineTuner:
    """``train_loop.Trainer`` for the SFT baselines: one optimizer step per batch of
    ``config.batch_size`` examples (a function of the step: resumes see the same batches)."""

    def __init__(self, method: str, model, examples: Sequence[Example], config: SFTConfig, pad_token_id: int = 0):
        if not examples:
            raise CCAError(f"{method} needs at least one training example")
        self.name, self.steps, self.config, self.method = method, config.steps, config, method
        self.examples, self.pad = examples, pad_token_id
        self.T, self.P = shapes(examples)
        self.params, self.dtype = model.params(), model.dtype
        self.frozen = None if method == "sft_full" else self.params
        # the optimizer depends on the master's structure only
        opt = make_optimizer(config, jax.eval_shape(lambda p: init_state(method, p, config)[0], self.params))
        self._step = make_step(method, config, model.config, opt, self.dtype)

    def init(self):
        master, opt_state, _, _ = init_state(self.method, self.params, self.config)
        return master, opt_state

    def step(self, master, opt_state, step):
        batch = to_device(step_batch(self.examples, self.config, step, self.T, self.P, self.pad), self.params)
        master, opt_state, loss, gnorm = self._step(master, opt_state, self.frozen, batch,
                                                    dropout_key(self.config, step))
        loss, gnorm = timing.fetch((loss, gnorm))
        return master, opt_state, {"loss": float(loss), "grad_norm": float(gnorm)}

    def is_eval_step(self, step):
        return self.config.is_eval_step(step)

    def working_params(self, master):
        return working_params(self.method, master, self.frozen, self.dtype, self.config)
