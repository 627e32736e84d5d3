"""Run configuration: frozen dataclasses loaded from YAML in ``configs/``, with
``--set a.b=value`` overrides. Unknown keys are errors that name the key."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Any

import yaml

from cca_jax.baselines.sft import SFTConfig
from cca_jax.cca.amplify import AmplifyConfig
from cca_jax.cca.dcm import DCMConfig
from cca_jax.cca.pivots import PivotConfig
from cca_jax.config import check_attention
from cca_jax.errors import CCAError


@dataclasses.dataclass(frozen=True)
class DataConfig:
    templates: str = "builtin"  # builtin | a template directory | a .jsonl | hub:main|p1|p2
    per_template: int = 50
    template_ids: tuple[int, ...] | None = None  # restrict to these templates
    select_threshold: float = 0.8  # keep templates whose base accuracy is below this
    select_on: str = "train"  # train (fix) | all (reference: uses test too)
    seed: int = 0
    # per-template train/val/test fractions; SPEC's 26/4/20 of 50. Small runs (the demo)
    # take a larger val share so that picking the amplification step is not a coin toss.
    split: tuple[float, float, float] = (0.52, 0.08, 0.40)

    def __post_init__(self):
        if self.select_on not in ("train", "all"):
            raise CCAError(f"data.select_on must be 'train' or 'all', got {self.select_on!r}")
        from cca_jax.data.gsm_symbolic import check_fractions

        object.__setattr__(self, "split", check_fractions(self.split))


@dataclasses.dataclass(frozen=True)
class EvalConfig:
    answer_mode: str = "fixed"  # fixed | reference
    shots: int = 8
    chat_template: bool = False
    max_new_tokens: int = 512  # train / val generations
    test_max_new_tokens: int = 1500
    batch_size: int = 32


@dataclasses.dataclass(frozen=True)
class PatchingConfig:
    """How ``localize: patching | attribution`` scores and selects components."""

    mode: str = "mean"  # zero | mean | counterfactual (another example of the same batch)
    top_k: int | None = None  # circuit size; None -> fraction
    fraction: float | None = 0.02
    by: str = "neg"  # neg: components whose patch lowers the logit difference most | abs
    batch_size: int = 8
    chunk: int = 256  # components per vmapped call


METHODS = ("cca", "sft_full", "sft_lora")


@dataclasses.dataclass(frozen=True)
class SideEffectsConfig:
    """Benchmarks run on the model before and after (SPEC 5): does the rest stay intact?"""

    tasks: tuple[str, ...] = ()  # mmlu, truthfulqa_mc1, truthfulqa_mc2, triviaqa, gsm8k; () = skip
    limit: int | None = None  # items per task (MMLU round-robin over subjects)
    data_dir: str | None = None  # None: $CCA_JAX_EVAL_DATA or ../shared/data/eval; "hub": download once
    batch_size: int = 16
    gsm8k_max_new_tokens: int = 256


@dataclasses.dataclass(frozen=True)
class RunConfig:
    model: str
    method: str = "cca"  # cca | sft_full | sft_lora (SPEC 5 baselines, configured by `sft:`)
    dtype: str = "float32"
    tokenizer: str | None = None  # None: the model's own; "char": tiny test models
    localize: str = "dcm"  # how the circuit is found: dcm | patching | attribution
    export: bool = False  # also write the amplified model as a HF directory (run_dir/amplified)
    # attention in calls without a cache (prefill, amplification steps): xla | tokamax
    # (fused kernels, pip install 'cca_jax[kernels]'; faster on H100/H200) | tokamax:<impl>
    attention: str = "xla"
    # JAX's persistent compilation cache (a rerun or resumed run compiles nothing):
    # "default" ($CCA_JAX_COMPILE_CACHE, else ~/.cache/cca_jax/xla), a directory, or "off"
    compile_cache: str = "default"
    data: DataConfig = DataConfig()
    eval: EvalConfig = EvalConfig()
    pivots: PivotConfig = PivotConfig()
    dcm: DCMConfig = DCMConfig()
    patching: PatchingConfig = PatchingConfig()
    amplify: AmplifyConfig = AmplifyConfig()
    sft: SFTConfig = SFTConfig()
    side_effects: SideEffectsConfig = SideEffectsConfig()

    def __post_init__(self):
        if self.method not in METHODS:
            raise CCAError(f"method must be one of {', '.join(METHODS)}, got {self.method!r}")
        check_attention(self.attention)

    def to_dict(self) -> dict:
        return json.loads(json.dumps(dataclasses.asdict(self)))


_SECTIONS = {"data": DataConfig, "eval": EvalConfig, "pivots": PivotConfig, "dcm": DCMConfig,
             "patching": PatchingConfig, "amplify": AmplifyConfig, "sft": SFTConfig,
             "side_effects": SideEffectsConfig}


def _coerce(cls, name: str, value: Any) -> Any:
    field = {f.name: f for f in dataclasses.fields(cls)}[name]
    if isinstance(value, list):
        return tuple(value)
    if field.type in ("float",) and isinstance(value, int):
        return float(value)
    return value


def _build(cls, raw: dict, where: str):
    if not isinstance(raw, dict):
        raise CCAError(f"{where}: expected a mapping")
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(raw) - names)
    if unknown:
        raise CCAError(f"{where}: unknown key(s) {', '.join(unknown)}; valid: {', '.join(sorted(names))}")
    kw = {}
    for k, v in raw.items():
        if k in _SECTIONS and cls is RunConfig:
            kw[k] = _build(_SECTIONS[k], v or {}, f"{where}.{k}")
        else:
            kw[k] = _coerce(cls, k, v)
    try:
        return cls(**kw)
    except TypeError as err:
        raise CCAError(f"{where}: {err}") from None


def apply_overrides(raw: dict, overrides: list[str]) -> dict:
    """``a.b=value`` (value parsed as YAML) into a nested dict."""
    raw = json.loads(json.dumps(raw))
    for item in overrides:
        if "=" not in item:
            raise CCAError(f"--set takes key=value, got {item!r}")
        key, value = item.split("=", 1)
        node = raw
        parts = key.strip().split(".")
        for p in parts[:-1]:
            node = node.setdefault(p, {})
            if not isinstance(node, dict):
                raise CCAError(f"--set {key}: {p} is not a section")
        node[parts[-1]] = yaml.safe_load(value)
    return raw


def load(path: str | Path, overrides: list[str] | None = None) -> RunConfig:
    p = Path(path)
    if not p.exists():
        raise CCAError(f"no such config file: {p}")
    try:
        raw = yaml.safe_load(p.read_text()) or {}
    except yaml.YAMLError as err:
        raise CCAError(f"{p}: invalid YAML ({str(err).splitlines()[0]})") from None
    raw = apply_overrides(raw, overrides or [])
    if "model" not in raw:
        raise CCAError(f"{p}: 'model' is required (a HF dir, hub id, .gguf, model YAML or offline name)")
    model = str(raw["model"])
    if model.endswith((".yaml", ".yml")) and not Path(model).is_absolute():
        # model YAMLs are relative to the run config's directory
        cand = (p.parent / model)
        if cand.exists():
            raw["model"] = str(cand.resolve())
    return _build(RunConfig, raw, str(p))


def from_dict(raw: dict) -> RunConfig:
    return _build(RunConfig, raw, "config")
