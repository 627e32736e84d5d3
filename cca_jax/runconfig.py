"""Run configuration: frozen dataclasses loaded from YAML in ``configs/``, with
``--set a.b=value`` overrides. Unknown keys are errors that name the key.

A config is a YAML path or the name of one the package carries (``tiny``,
``gemma-2-2b-it``: ``configs/*.yaml`` of the repository, installed with the wheel as
``cca_jax/configs``; ``names()`` lists them).

Every field is checked as its dataclass is built, against its declared type and the
range or choices in ``RULES``: a bad value is one line naming the field, before any
model is loaded or anything is written."""

from __future__ import annotations

import copy
import dataclasses
import functools
import json
from pathlib import Path

import yaml

from cca_jax import validate
from cca_jax.baselines.sft import SFTConfig
from cca_jax.cca.amplify import AmplifyConfig
from cca_jax.cca.dcm import DCMConfig
from cca_jax.cca.patching import MODES as PATCHING_MODES
from cca_jax.cca.pivots import PivotConfig
from cca_jax.config import ATTENTION, parse_dtype
from cca_jax.data.answers import MODES as ANSWER_MODES
from cca_jax.errors import CCAError
from cca_jax.mesh import MeshConfig
from cca_jax.package_files import configs_dir, packaged  # noqa: F401 (runconfig.packaged: public here too)
from cca_jax.validate import COUNT, NONEMPTY, SEED, Rule, above, at_least, at_most, one_of
from cca_jax.evaluate.tasks import RENAMED as RENAMED_TASKS
from cca_jax.evaluate.tasks import TASKS

METHODS = ("cca", "sft_full", "sft_lora")
SPECULATIVE = ("auto", "off", "ngram", "model")
LOCALIZE = ("dcm", "patching", "attribution", "random")


def _is_dtype(name) -> bool:
    if name == "auto":  # the checkpoint's own (load.load_model)
        return True
    try:
        parse_dtype(name)
    except CCAError:
        return False
    return True


# field -> rule(s) of RunConfig's own fields and of its sections defined here; amplify,
# dcm, pivots and sft keep theirs next to their dataclasses
RULES: dict[str, dict] = {
    "": {"model": NONEMPTY, "method": one_of(*METHODS), "localize": one_of(*LOCALIZE),
         "dtype": Rule(_is_dtype, "a dtype: auto (the checkpoint's own), float32, bfloat16 or float16"),
         "attention": one_of(*ATTENTION),
         "tokenizer": Rule(lambda v: v == "char", "'char' or null (the model's own)"),
         "compile_cache": NONEMPTY},
    "data": {"templates": NONEMPTY, "per_template": COUNT, "template_ids": at_least(0),
             "select_threshold": above(0), "select_on": one_of("train", "all"), "seed": SEED},
    "eval": {"answer_mode": one_of(*ANSWER_MODES), "shots": at_least(0), "max_new_tokens": COUNT,
             "test_max_new_tokens": COUNT, "batch_size": COUNT},
    "patching": {"mode": one_of(*PATCHING_MODES), "top_k": COUNT, "fraction": (above(0), at_most(1)),
                 "by": one_of("neg", "abs"), "batch_size": COUNT, "chunk": COUNT},
    "random": {"like": NONEMPTY, "fraction": (above(0), at_most(1)), "seed": SEED},
    "side_effects": {"tasks": Rule(lambda v: v in TASKS, f"one of {', '.join(TASKS)} (renamed: "
                                   + ", ".join(f"{a} is now {b}" for a, b in RENAMED_TASKS.items()) + ")"),
                     "limit": COUNT, "data_dir": NONEMPTY, "batch_size": COUNT, "gsm8k_max_new_tokens": COUNT},
    "generation": {"speculative": one_of(*SPECULATIVE), "k": (COUNT, at_most(16)), "ngram": (COUNT, at_most(8)),
                   "draft": NONEMPTY},
}


def check_fields(obj, section: str) -> None:
    validate.check_fields(obj, section, RULES[section])


# -- the run config -----------------------------------------------------------------------

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
        from cca_jax.data.gsm_symbolic import check_fractions

        if isinstance(self.split, (list, tuple)) and all(isinstance(x, (int, float)) for x in self.split):
            check_fractions(self.split)  # numbers: its message says what three fractions are needed
        check_fields(self, "data")
        if self.template_ids == ():
            raise CCAError("data.template_ids is empty: list template ids, or null for all")
        object.__setattr__(self, "split", check_fractions(self.split))


@dataclasses.dataclass(frozen=True)
class EvalConfig:
    answer_mode: str = "fixed"  # fixed | reference
    shots: int = 8
    chat_template: bool = False
    max_new_tokens: int = 512  # train / val generations
    test_max_new_tokens: int = 1500
    batch_size: int = 32

    def __post_init__(self):
        check_fields(self, "eval")


@dataclasses.dataclass(frozen=True)
class PatchingConfig:
    """How ``localize: patching | attribution`` scores and selects components."""

    mode: str = "mean"  # zero | mean | counterfactual (another example of the same batch)
    top_k: int | None = None  # circuit size; None -> fraction
    fraction: float | None = 0.02
    by: str = "neg"  # neg: components whose patch lowers the logit difference most | abs
    batch_size: int = 8
    chunk: int = 256  # components per vmapped call

    def __post_init__(self):
        check_fields(self, "patching")
        if self.top_k is None and self.fraction is None:
            raise CCAError("patching: set top_k or fraction (both are null)")


@dataclasses.dataclass(frozen=True)
class RandomCircuitConfig:
    """``localize: random``: a control circuit drawn uniformly at random, either with the
    same number of components of each type in each layer as another run's circuit
    (``like``: its run directory, or a mask.npz) or ``fraction`` of each type per layer."""

    like: str | None = None
    fraction: float | None = None
    seed: int = 0

    def __post_init__(self):
        check_fields(self, "random")
        if self.like is not None and self.fraction is not None:
            raise CCAError("random: set like or fraction, not both")


@dataclasses.dataclass(frozen=True)
class SideEffectsConfig:
    """Benchmarks run on the model before and after (SPEC 5): does the rest stay intact?"""

    tasks: tuple[str, ...] = ()  # evaluate.tasks.TASKS; () = skip
    limit: int | None = None  # items per task (MMLU round-robin over subjects)
    data_dir: str | None = None  # None: $CCA_JAX_EVAL_DATA or ../shared/data/eval; "hub": download once
    batch_size: int = 16
    gsm8k_max_new_tokens: int = 256

    def __post_init__(self):
        check_fields(self, "side_effects")


@dataclasses.dataclass(frozen=True)
class GenerationSettings:
    """How every stage generates (evaluation, pivot sampling, the test, side effects).

    Speculative decoding (cca_jax/speculative.py) is exact: the same greedy tokens (up to
    floating-point ties) and the same sampling distribution as plain decoding. auto: off
    on every backend; n-gram drafts were measured slower than plain decoding on an H200
    and on the CPU (speculative_method, BENCHMARKS.md)."""

    speculative: str = "auto"  # auto | off | ngram (drafts from the prompt and output) | model
    k: int = 4  # draft tokens per verify step
    ngram: int = 3  # longest suffix the n-gram lookup matches
    draft: str | None = None  # speculative: model: the draft model (same tokenizer), any model source

    def __post_init__(self):
        check_fields(self, "generation")
        if self.speculative == "model" and self.draft is None:
            raise CCAError("generation.speculative: model needs generation.draft (a smaller model with the same "
                           "tokenizer)")

    def sampler(self) -> dict | None:
        """What decides sampled tokens beyond the seed: None for plain decoding, else the
        resolved speculative settings (part of the pivot stage's key)."""
        method = speculative_method(self.speculative)
        if method == "off":
            return None
        return {"speculative": method, "k": self.k, "ngram": self.ngram,
                **({"draft": self.draft} if method == "model" else {})}

    def options(self, dtype: str = "auto") -> dict:
        """``generate``'s keyword arguments (auto resolved for this process's backend; a
        draft model loaded once)."""
        method = speculative_method(self.speculative)
        opts = {"speculative": method, "spec_k": self.k, "spec_ngram": self.ngram}
        if method == "model":
            from cca_jax import models

            opts["draft_model"] = _load_draft(models.source(self.draft), dtype)
        return opts


def speculative_method(method: str) -> str:
    """``auto``: off on every backend. Measured: on an H200, n-gram drafts on GSM 8-shot
    prompts (Qwen2.5-Coder-0.5B, batch 32) ran at 0.77-0.89x plain decoding for k = 2..6,
    and at 0.97-1.08x on the CPU (BENCHMARKS.md): the batch's rows seldom agree long
    enough for a verify step to pay. ``ngram`` and ``model`` stay available by name."""
    return "off" if method == "auto" else method


@functools.lru_cache(maxsize=1)
def _load_draft(source: str, dtype: str):
    """The draft model, loaded once per process."""
    from cca_jax.load import load_model

    model, _ = load_model(source, dtype=dtype, with_tokenizer=False)
    return model


@dataclasses.dataclass(frozen=True)
class RunConfig:
    model: str
    method: str = "cca"  # cca | sft_full | sft_lora (SPEC 5 baselines, configured by `sft:`)
    dtype: str = "auto"  # the checkpoint's own (bfloat16 for gemma-2), or float32 | bfloat16 | float16
    tokenizer: str | None = None  # None: the model's own; "char": tiny test models
    localize: str = "dcm"  # how the circuit is found: dcm | patching | attribution
    export: bool = False  # also write the amplified model as a HF directory (run_dir/amplified)
    # attention in calls without a cache (prefill, amplification steps): xla | tokamax
    # (fused kernels, pip install 'cca_jax[kernels]'; faster on H100/H200) | tokamax:<impl>
    attention: str = "xla"
    # JAX's persistent compilation cache (a rerun or resumed run compiles nothing): a
    # directory, "off", or "default" ($CCA_JAX_COMPILE_CACHE, else ~/.cache/cca_jax/xla on
    # GPU/TPU and off on the CPU: see timing.cache_dir)
    compile_cache: str = "default"
    data: DataConfig = DataConfig()
    eval: EvalConfig = EvalConfig()
    pivots: PivotConfig = PivotConfig()
    dcm: DCMConfig = DCMConfig()
    patching: PatchingConfig = PatchingConfig()
    random: RandomCircuitConfig = RandomCircuitConfig()
    amplify: AmplifyConfig = AmplifyConfig()
    sft: SFTConfig = SFTConfig()
    side_effects: SideEffectsConfig = SideEffectsConfig()
    generation: GenerationSettings = GenerationSettings()
    # the device mesh (fsdp x tp devices, default one) and each stage's layout on it: cca_jax/mesh.py
    mesh: MeshConfig = MeshConfig()

    def __post_init__(self):
        check_fields(self, "")  # the sections checked themselves when they were built
        if self.localize == "random" and self.random.like is None and self.random.fraction is None:
            raise CCAError("localize: random needs random.like (a run directory whose circuit's size to match) "
                           "or random.fraction")

    def to_dict(self) -> dict:
        return json.loads(json.dumps(dataclasses.asdict(self)))


_SECTIONS = {"data": DataConfig, "eval": EvalConfig, "pivots": PivotConfig, "dcm": DCMConfig,
             "patching": PatchingConfig, "random": RandomCircuitConfig, "amplify": AmplifyConfig, "sft": SFTConfig,
             "side_effects": SideEffectsConfig, "generation": GenerationSettings, "mesh": MeshConfig}


def section(name: str, raw: dict):
    """Section ``name`` of a run config (e.g. "mesh") from its raw mapping, checked as in
    a config file (``eval`` and ``bench-tasks`` take the mesh section alone)."""
    return _build(_SECTIONS[name], raw, name)


def _build(cls, raw, section: str = ""):
    if not isinstance(raw, dict):
        raise CCAError(f"{section} must be a mapping of its keys, got {raw!r}" if section
                       else f"a run config is a mapping of keys (model: ..., data: ...), got {raw!r}")
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(str(k) for k in set(raw) - names)
    if unknown:
        where = f" in section {section}" if section else ""
        raise CCAError(f"unknown key(s) {', '.join(unknown)}{where}; valid: {', '.join(sorted(names))}")
    kw = {k: _build(_SECTIONS[k], v or {}, k) if cls is RunConfig and k in _SECTIONS else v for k, v in raw.items()}
    try:
        return cls(**kw)
    except TypeError as err:  # a required key missing
        raise CCAError(f"{section or 'config'}: {err}") from None


def apply_overrides(raw: dict, overrides: list[str]) -> dict:
    """``a.b=value`` (value parsed as YAML) into a nested dict."""
    raw = copy.deepcopy(raw)
    for item in overrides:
        if "=" not in item:
            raise CCAError(f"--set takes key=value, got {item!r}")
        key, value = item.split("=", 1)
        node = raw
        parts = key.strip().split(".")
        for p in parts[:-1]:
            if node.get(p) is None:  # absent, or an empty section in the YAML (``dcm:``)
                node[p] = {}
            node = node[p]
            if not isinstance(node, dict):
                raise CCAError(f"--set {key}: {p} is not a section")
        try:
            node[parts[-1]] = yaml.safe_load(value)
        except yaml.YAMLError as err:
            raise CCAError(f"--set {item}: the value is not valid YAML ({str(err).splitlines()[0]})") from None
    return raw


def _read(p: Path):
    """The YAML mapping in ``p``; one-line errors for what cannot be a run config."""
    if not p.exists():
        raise CCAError(f"no such config file: {p}")
    if p.is_dir():
        raise CCAError(f"{p}: is a directory; give a run config YAML file (e.g. configs/tiny.yaml)")
    try:
        text = p.read_text(encoding="utf-8")
    except UnicodeDecodeError:
        raise CCAError(f"{p}: not a UTF-8 text file; give a run config YAML file") from None
    except OSError as err:
        raise CCAError(f"{p}: cannot read it ({err.strerror or err})") from None
    try:
        raw = yaml.safe_load(text)
    except yaml.YAMLError as err:
        raise CCAError(f"{p}: invalid YAML ({str(err).splitlines()[0]})") from None
    if raw is None:
        return {}
    if not isinstance(raw, dict):
        raise CCAError(f"{p}: a run config is a mapping of keys (model: ..., data: ...), "
                       f"got a YAML {type(raw).__name__}")
    return raw


# -- configs the package carries --------------------------------------------------------------

def names() -> list[str]:
    """Names of the packaged run configs (``cca-jax run NAME``)."""
    return sorted(p.stem for p in configs_dir().glob("*.yaml"))


def resolve(config: str | Path) -> Path:
    """A run config argument as a file: an existing path, else a packaged config's name."""
    p = Path(config)
    if p.exists():
        return p
    found = packaged(config)
    if found is not None:
        return found
    raise CCAError(f"no such config file: {config} (and no packaged config of that name: "
                   f"{', '.join(names())}; `cca-jax configs` shows them)")


def load(path: str | Path, overrides: list[str] | None = None) -> RunConfig:
    """The config in ``path`` (a YAML file, or a packaged config's name: ``tiny``) with
    ``overrides``; every field checked (type, range, choices) before anything is loaded
    or written."""
    p = resolve(path)
    raw = apply_overrides(_read(p), overrides or [])
    if "model" not in raw:
        raise CCAError(f"{p}: 'model' is required (a HF dir, hub id, .gguf, model YAML or offline name)")
    model = raw["model"]
    if isinstance(model, str) and model.endswith((".yaml", ".yml")) and not Path(model).is_absolute():
        # model YAMLs are relative to the run config's directory
        cand = (p.parent / model)
        if cand.exists():
            raw["model"] = str(cand.resolve())
    try:
        return _build(RunConfig, raw)
    except CCAError as err:
        raise CCAError(f"{p}: {err}") from None


def from_dict(raw: dict) -> RunConfig:
    return _build(RunConfig, raw)


# -- output paths -------------------------------------------------------------------------
