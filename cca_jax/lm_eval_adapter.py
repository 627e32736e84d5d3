"""lm-evaluation-harness on cca_jax models: the ``cca_jax`` model of the harness
(``pip install 'cca-jax[lmeval]'``).

Any harness task then runs on an original model or on a finished run's amplified (or
fine-tuned) model:

    cca-jax lm-eval --model cca_jax --model_args pretrained=google/gemma-2-2b-it,run_dir=runs/gemma \\
        --tasks gsm8k,mmlu --batch_size 16

(``cca-jax lm-eval`` is the harness's own command line with this model registered; in
Python, importing this module registers it: ``lm_eval.simple_evaluate(model="cca_jax",
model_args=...)`` or ``simple_evaluate(model=CCAJaxLM(model=..., tokenizer=...))``.)

model_args: ``pretrained`` (a HF directory, hub id, .gguf, model YAML or offline name),
``run_dir`` (a finished run: its best trained weights on ``pretrained``, or on the model
its config.yaml names when ``pretrained`` is not given), ``dtype`` (default auto: the
checkpoint's own), ``batch_size``, ``max_gen_toks`` (256), ``max_length`` (the model's
context), ``tokenizer=char`` (tiny random test models), ``attention``, ``seed``.

Requests run on the same code as ``cca-jax bench-tasks``: log-likelihoods on
``evaluate.loglik`` (requests sharing a long token prefix, such as a task's few-shot
context, are grouped and that prefix is encoded once), generation on
``generate.generate`` (greedy unless the task samples, cut at the task's stop strings).
Texts are encoded as bench-tasks encodes them (``loglik.encode_pairs``: the tokenizer's
special tokens, e.g. BOS, included).
"""

from __future__ import annotations

import json
from typing import Any, Sequence

from lm_eval.api.model import LM
from lm_eval.api.registry import register_model

from cca_jax.errors import CCAError

NAME = "cca_jax"
DEFAULT_BATCH = 16


def _int(value, what: str) -> int | None:
    if value is None or (isinstance(value, str) and value.startswith("auto")):
        return None  # the harness's "auto": our default
    try:
        n = int(value)
    except (TypeError, ValueError):
        raise CCAError(f"model_args {what}={value!r}: not an integer") from None
    if n < 1:
        raise CCAError(f"model_args {what} must be >= 1, got {n}")
    return n


def group_by_prefix(contexts: Sequence[Sequence[int]], min_len: int = 8) -> list[tuple[int, list[int]]]:
    """Requests in groups that share a long token prefix: [(prefix length, indices)].

    Contexts are sorted; neighbours whose common prefix is at least ``min_len`` tokens and
    half the shorter context stay in one group (a task's few-shot context; not the first
    words every prompt starts with). Each group's prefix leaves every context one token
    of its own. Requests that share nothing long end in one group with prefix 0."""
    from cca_jax.evaluate.loglik import shared_prefix

    order = sorted(range(len(contexts)), key=lambda i: tuple(contexts[i]))
    runs: list[list[int]] = []
    for i in order:
        if runs:
            prev = contexts[runs[-1][-1]]
            cur = contexts[i]
            n = 0
            limit = min(len(prev), len(cur))
            while n < limit and prev[n] == cur[n]:
                n += 1
            if n >= max(min_len, min(len(prev), len(cur)) // 2):
                runs[-1].append(i)
                continue
        runs.append([i])
    groups, loose = [], []
    for run in runs:
        n = shared_prefix([contexts[i] for i in run], min_len) if len(run) > 1 else 0
        if n:
            groups.append((n, sorted(run)))
        else:
            loose += run
    if loose:
        groups.append((0, sorted(loose)))
    return groups


def stop_at(tokenizer, until: Sequence[str]):
    """A ``generate`` stop rule: keep the generated tokens through the first that
    completes one of the ``until`` strings."""
    until = [u for u in until if u]

    def rule(ids):
        if not until:
            return None
        text = tokenizer.decode(list(ids), skip_special_tokens=True)
        if not any(u in text for u in until):
            return None
        for k in range(1, len(ids) + 1):
            part = tokenizer.decode(list(ids[:k]), skip_special_tokens=True)
            if any(u in part for u in until):
                return k
        return len(ids)

    return rule


def cut(text: str, until: Sequence[str]) -> str:
    """``text`` up to the first of the stop strings (the harness's convention: the stop
    string itself is not returned)."""
    end = len(text)
    for u in until:
        if u and u in text:
            end = min(end, text.index(u))
    return text[:end]


@register_model(NAME)
class CCAJaxLM(LM):
    """A cca_jax model (and tokenizer) as an lm-evaluation-harness LM."""

    def __init__(self, pretrained: str | None = None, run_dir: str | None = None, dtype: str = "auto",
                 batch_size: Any = DEFAULT_BATCH, max_gen_toks: Any = 256, max_length: Any = None,
                 tokenizer: Any = None, attention: str = "xla", seed: Any = 0, model: Any = None,
                 device: Any = None, max_batch_size: Any = None, **unknown):
        super().__init__()
        if unknown:
            raise CCAError(f"model_args: unknown {', '.join(sorted(unknown))}; cca_jax takes pretrained, run_dir, "
                           f"dtype, batch_size, max_gen_toks, max_length, tokenizer, attention, seed")
        self.model, self.tokenizer = self._load(pretrained, run_dir, dtype, tokenizer, attention, model)
        self.batch_size = _int(batch_size, "batch_size") or DEFAULT_BATCH
        self.max_gen_toks = _int(max_gen_toks, "max_gen_toks") or 256
        self.max_length = _int(max_length, "max_length") or int(self.model.config.max_position_embeddings)
        self.seed = int(seed)

    @staticmethod
    def _load(pretrained, run_dir, dtype, tokenizer, attention, model):
        from cca_jax import load_model, models, runs

        tok = tokenizer if tokenizer is not None and not isinstance(tokenizer, str) else None
        if model is None and pretrained is None and run_dir is None:
            raise CCAError("model_args: give pretrained=MODEL and/or run_dir=RUN_DIR")
        if model is None and pretrained is None:
            model, tok, _ = runs.load(run_dir)
        else:
            if model is None:
                model, tok = load_model(models.source(str(pretrained)), dtype=dtype, attention=attention)
            if run_dir is not None:
                model = runs.trained_model(run_dir, model)
        if tokenizer == "char":
            from cca_jax.char_tokenizer import char_tokenizer

            tok = char_tokenizer(model.config.vocab_size)
        if tok is None:
            raise CCAError(f"{pretrained or run_dir}: no tokenizer: pass tokenizer=char for random test models")
        return model, tok

    # -- helpers -------------------------------------------------------------------------

    @property
    def pad_token_id(self) -> int:
        return self.tokenizer.pad_token_id if self.tokenizer.pad_token_id is not None else 0

    @property
    def prefix_token_id(self) -> int:
        """The token a text with no context is scored after (BOS, else EOS), as the harness's
        Hugging Face model does."""
        tok = self.tokenizer
        for t in (tok.bos_token_id, tok.eos_token_id, self.model.config.bos_token_id):
            if t is not None:
                return int(t)
        return self.pad_token_id

    @property
    def tokenizer_name(self) -> str:
        return getattr(self.tokenizer, "name_or_path", "") or "cca_jax"

    def _score(self, pairs: Sequence[tuple[list[int], list[int]]]) -> list[tuple[float, bool]]:
        """(sum log p(continuation | context), whether greedy decoding gives it) per pair."""
        from cca_jax.evaluate import loglik

        out: list[tuple[float, bool] | None] = [None] * len(pairs)
        # a context too long for the model loses its oldest tokens
        pairs = [(self._fit(c, len(x)), x) for c, x in pairs]
        for n, idx in group_by_prefix([c for c, _ in pairs]):
            lps, greedy = loglik.continuation_logprobs(
                self.model, pairs[idx[0]][0][:n], [(pairs[i][0][n:], pairs[i][1]) for i in idx],
                batch_size=self.batch_size, pad_token_id=self.pad_token_id, with_greedy=True)
            for i, lp, g in zip(idx, lps, greedy):
                out[i] = (float(sum(lp)), bool(g))
        return out  # type: ignore[return-value]

    def _fit(self, context: list[int], n_cont: int) -> list[int]:
        keep = max(1, self.max_length - n_cont)
        return context[-keep:] if len(context) > keep else context

    # -- the harness's interface ---------------------------------------------------------

    def loglikelihood(self, requests, disable_tqdm: bool = False) -> list[tuple[float, bool]]:
        from cca_jax.evaluate import loglik

        args = [r.args for r in requests]
        if not args:
            return []
        pairs = loglik.encode_pairs(self.tokenizer, [c for c, _ in args], [x for _, x in args])
        pairs = [(c if c else [self.prefix_token_id], x) for c, x in pairs]
        if any(not x for _, x in pairs):
            raise CCAError("lm-eval asked for the log-likelihood of an empty continuation")
        res = self._score(pairs)
        for a, r in zip(args, res):
            self.cache_hook.add_partial("loglikelihood", a, r)
        return res

    def loglikelihood_rolling(self, requests, disable_tqdm: bool = False) -> list[float]:
        from lm_eval.utils import get_rolling_token_windows, make_disjoint_window

        pairs, owner = [], []
        for k, r in enumerate(requests):
            ids = list(self.tokenizer(r.args[0], add_special_tokens=False)["input_ids"])
            for w in get_rolling_token_windows(token_list=ids, prefix_token=self.prefix_token_id,
                                               max_seq_len=self.max_length, context_len=1):
                c, x = make_disjoint_window(w)
                pairs.append((list(c), list(x)))
                owner.append(k)
        sums = [0.0] * len(requests)
        for k, (ll, _) in zip(owner, self._score(pairs) if pairs else []):
            sums[k] += ll
        for r, s in zip(requests, sums):
            self.cache_hook.add_partial("loglikelihood_rolling", r.args, s)
        return sums

    def generate_until(self, requests, disable_tqdm: bool = False) -> list[str]:
        out: list[str | None] = [None] * len(requests)
        groups: dict[str, list[int]] = {}
        for i, r in enumerate(requests):  # one generate call per distinct setting
            groups.setdefault(json.dumps(r.args[1] or {}, sort_keys=True, default=str), []).append(i)
        for key, idx in groups.items():
            texts = self._generate([requests[i].args[0] for i in idx], json.loads(key))
            for i, t in zip(idx, texts):
                out[i] = t
                self.cache_hook.add_partial("generate_until", requests[i].args, t)
        return out  # type: ignore[return-value]

    def _generate(self, contexts: Sequence[str], kw: dict) -> list[str]:
        import jax

        from cca_jax.generate import generate, stop_ids

        kw = dict(kw)
        until = kw.pop("until", None) or []
        until = [until] if isinstance(until, str) else list(until)
        max_new = _int(kw.pop("max_gen_toks", None), "max_gen_toks") or self.max_gen_toks
        sample = bool(kw.pop("do_sample", False))
        temperature = float(kw.pop("temperature", 0.0) or 0.0) if sample else 0.0
        top_k = kw.pop("top_k", None)
        top_p = kw.pop("top_p", None)
        if sample and temperature == 0.0:
            temperature = 1.0  # do_sample without a temperature: transformers' default
        prompts = [self._fit(list(ids), max_new) for ids in self.tokenizer(list(contexts))["input_ids"]]
        prompts = [p if p else [self.prefix_token_id] for p in prompts]
        outs = generate(self.model, prompts, max_new, temperature=temperature,
                        top_k=int(top_k) if top_k is not None and temperature > 0 else None,
                        top_p=float(top_p) if top_p is not None and temperature > 0 else None,
                        stop=stop_at(self.tokenizer, until), key=jax.random.key(self.seed) if temperature > 0 else None,
                        eos_token_id=stop_ids(self.model, self.tokenizer), pad_token_id=self.pad_token_id,
                        batch_size=self.batch_size)
        return [cut(self.tokenizer.decode(ids, skip_special_tokens=True), until) for ids in outs]


def cli(argv: Sequence[str]) -> int:
    """lm-evaluation-harness's command line with the ``cca_jax`` model registered."""
    import sys

    from lm_eval.__main__ import cli_evaluate

    old = sys.argv
    sys.argv = ["lm-eval", *argv]
    try:
        cli_evaluate()
    finally:
        sys.argv = old
    return 0
