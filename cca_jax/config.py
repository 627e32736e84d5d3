"""ModelConfig: every architectural switch of the supported decoder families as a field.

Families differ only in their config and weight-mapping table, not in model code.
Configs come from a ``transformers`` config (``from_hf``) or from GGUF metadata
(``cca_jax.weights.gguf``); features the model does not implement are rejected with a
message naming the field, never silently ignored.
"""

from __future__ import annotations

import dataclasses
import functools
import numbers
from typing import Any, Mapping

from cca_jax.errors import CCAError, UnsupportedConfigError

FAMILIES = ("llama", "qwen2", "gemma2", "gemma3", "olmo2")
ACTIVATIONS = ("silu", "gelu_pytorch_tanh")
ROPE_TYPES = ("default", "linear", "llama3")
DTYPES = ("float32", "bfloat16", "float16")
# How calls without a cache (prefill, caching a prefix, gradient steps) compute attention:
# "xla" (this package's einsums), "tokamax" (tokamax's fused kernels, the implementation
# its own choice for the platform), or "tokamax:<implementation>" to force one.
ATTENTION = ("xla", "tokamax", "tokamax:mosaic", "tokamax:triton", "tokamax:cudnn", "tokamax:xla")


def check_attention(name: str) -> str:
    if name not in ATTENTION:
        raise CCAError(f"attention must be one of {', '.join(ATTENTION)}; got {name!r}")
    return name

# Sizes a config states, with upper bounds far above any released model yet low enough
# that a typo (1e8 layers) is refused at once, before transformers or this package builds
# per-layer lists or buffers. transformers' field name -> bound.
SIZE_LIMITS = {
    "num_hidden_layers": 4096,
    "num_attention_heads": 4096,
    "num_key_value_heads": 4096,
    "head_dim": 1 << 16,
    "hidden_size": 1 << 20,
    "intermediate_size": 1 << 22,
    "vocab_size": 1 << 24,
    "max_position_embeddings": 1 << 40,
}
_WINDOW_LIMIT = 1 << 40  # sliding_window: checked only where layers use it
# ModelConfig's name for each of them.
_OUR_NAMES = {"num_hidden_layers": "num_layers", "num_attention_heads": "num_heads",
              "num_key_value_heads": "num_kv_heads"}


def check_size(value: Any, field: str, limit: int, where: str = "config field") -> int:
    """A whole number from 1 to ``limit`` (not a bool, not 1e8 written as a float)."""
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or not 1 <= value <= limit:
        raise UnsupportedConfigError(f"{where} {field} must be a whole number from 1 to {limit}, got {value!r}")
    return int(value)


def check_hf_sizes(raw: Mapping[str, Any], where: str) -> None:
    """Check the sizes of a raw config dict (config.json, GGUF metadata) before anything is
    built from them; absent or null fields are left to the defaults."""
    for field, limit in SIZE_LIMITS.items():
        if raw.get(field) is not None:
            check_size(raw[field], field, limit, f"{where}:")
    text = raw.get("text_config")
    if isinstance(text, Mapping):  # multimodal gemma3: the text decoder's sizes
        check_hf_sizes(text, f"{where} text_config")


def _number(value: Any, field: str) -> float:
    if isinstance(value, bool) or not isinstance(value, numbers.Real) or value != value:
        raise UnsupportedConfigError(f"config field {field} must be a number, got {value!r}")
    return float(value)


# model_type values of transformers configs -> our family.
_MODEL_TYPES = {
    "llama": "llama",
    "mistral": "llama",
    "qwen2": "qwen2",
    "gemma2": "gemma2",
    "gemma3_text": "gemma3",
    "gemma3": "gemma3",
    "olmo2": "olmo2",
}


@dataclasses.dataclass(frozen=True)
class RopeConfig:
    """Rotary embedding for one layer type. ``factor`` etc. only for scaled variants."""

    theta: float = 10000.0
    type: str = "default"
    factor: float = 1.0
    low_freq_factor: float = 1.0
    high_freq_factor: float = 4.0
    original_max_position_embeddings: int = 8192


@dataclasses.dataclass(frozen=True)
class Tuning:
    """Performance switches of the forward pass: not architecture, never saved; static
    (part of every compiled program's key), so a changed value compiles anew."""

    # cached calls of at most this many new tokens (decoding, the DCM and patching steps)
    # read the cache in place and write their keys/values after the layers
    read_cache_tokens: int = 8
    # long calls without a cache run causal attention in up to this many query blocks of
    # at least min_block tokens (the blocks above the diagonal are never computed)
    causal_blocks: int = 4
    min_block: int = 256


@dataclasses.dataclass(frozen=True)
class ModelConfig:
    family: str
    vocab_size: int
    hidden_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    intermediate_size: int
    rms_norm_eps: float = 1e-6
    hidden_act: str = "silu"
    # Biases: qwen2 has q/k/v biases only; llama's attention_bias puts them on q/k/v/o.
    qkv_bias: bool = False
    o_bias: bool = False
    mlp_bias: bool = False
    # Norms. gemma: RMSNorm scales by (1 + w); pre/post placement per family.
    norm_plus_one: bool = False
    pre_attn_norm: bool = True
    post_attn_norm: bool = False
    pre_mlp_norm: bool = True
    post_mlp_norm: bool = False
    # q/k RMSNorm: None, "head" (gemma3: over head_dim) or "full" (olmo2: whole projection).
    qk_norm: str | None = None
    embed_scale: bool = False  # gemma: embeddings times sqrt(hidden_size)
    query_pre_attn_scalar: float | None = None  # gemma: scores scale by this ** -0.5, else head_dim
    attn_logit_softcap: float | None = None
    final_logit_softcap: float | None = None
    sliding_window: int | None = None
    # Per layer: True where the layer uses the sliding window (and the local rope).
    sliding_layers: tuple[bool, ...] = ()
    rope: RopeConfig = RopeConfig()
    rope_local: RopeConfig | None = None  # gemma3: rope of sliding layers
    tie_word_embeddings: bool = False
    max_position_embeddings: int = 8192
    bos_token_id: int | None = None
    eos_token_id: int | tuple[int, ...] | None = None
    pad_token_id: int | None = None
    # Not architecture: how attention is computed (see ATTENTION), like transformers'
    # attn_implementation. Never saved with a checkpoint (to_dict leaves it out).
    attention: str = "xla"
    tuning: Tuning = Tuning()  # runtime too: see Tuning

    def __post_init__(self):
        check_attention(self.attention)
        if not isinstance(self.tuning, Tuning):
            raise CCAError(f"ModelConfig tuning must be a config.Tuning, got {self.tuning!r}")
        for hf_field, limit in SIZE_LIMITS.items():  # first: the checks below divide by them
            name = _OUR_NAMES.get(hf_field, hf_field)
            check_size(getattr(self, name), name, limit, "ModelConfig")
        if self.sliding_window is not None:
            check_size(self.sliding_window, "sliding_window", _WINDOW_LIMIT, "ModelConfig")
        if self.family not in FAMILIES:
            raise UnsupportedConfigError(
                f"unsupported model family {self.family!r}: supported are {', '.join(FAMILIES)}"
            )
        if self.hidden_act not in ACTIVATIONS:
            raise UnsupportedConfigError(
                f"unsupported hidden_act {self.hidden_act!r}: supported are {', '.join(ACTIVATIONS)}"
            )
        if self.qk_norm not in (None, "head", "full"):
            raise UnsupportedConfigError(f"qk_norm must be None, 'head' or 'full', not {self.qk_norm!r}")
        if self.num_heads % self.num_kv_heads:
            raise UnsupportedConfigError(
                f"num_attention_heads ({self.num_heads}) must be a multiple of "
                f"num_key_value_heads ({self.num_kv_heads})"
            )
        for r in (self.rope, self.rope_local):
            if r is not None and r.type not in ROPE_TYPES:
                raise UnsupportedConfigError(
                    f"unsupported rope_type {r.type!r}: supported are {', '.join(ROPE_TYPES)}"
                )
        if not self.sliding_layers:
            object.__setattr__(self, "sliding_layers", (False,) * self.num_layers)
        if len(self.sliding_layers) != self.num_layers:
            raise UnsupportedConfigError(
                f"layer_types has {len(self.sliding_layers)} entries for {self.num_layers} layers"
            )
        if any(self.sliding_layers) and not self.sliding_window:
            raise UnsupportedConfigError("layer_types has sliding layers but sliding_window is not set")

    # Sizes used by circuits and reports.
    @property
    def components_per_layer(self) -> int:
        return self.num_heads + 2 * self.num_kv_heads + self.intermediate_size

    @property
    def num_components(self) -> int:
        return self.num_layers * self.components_per_layer

    @property
    def scale(self) -> float:
        return (self.query_pre_attn_scalar or self.head_dim) ** -0.5

    def replace(self, **changes) -> "ModelConfig":
        return dataclasses.replace(self, **changes)

    def to_dict(self) -> dict:
        d = dataclasses.asdict(self)
        d.pop("attention")  # runtime choices, not part of the model
        d.pop("tuning")
        return d

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> "ModelConfig":
        d = dict(d)
        d["rope"] = RopeConfig(**d["rope"])
        if d.get("rope_local") is not None:
            d["rope_local"] = RopeConfig(**d["rope_local"])
        d["sliding_layers"] = tuple(d.get("sliding_layers", ()))
        if isinstance(d.get("eos_token_id"), list):
            d["eos_token_id"] = tuple(d["eos_token_id"])
        return cls(**d)


def _get(cfg: Any, name: str, default: Any = None) -> Any:
    return getattr(cfg, name, default) if not isinstance(cfg, Mapping) else cfg.get(name, default)


def _rope_from_params(params: Mapping[str, Any] | None, field: str) -> RopeConfig:
    if not params:
        return RopeConfig()
    if not isinstance(params, Mapping):
        raise UnsupportedConfigError(f"{field} must be a dictionary, got {params!r}")
    rtype = params.get("rope_type", params.get("type", "default")) or "default"
    if rtype not in ROPE_TYPES:
        raise UnsupportedConfigError(
            f"unsupported {field}.rope_type {rtype!r}: supported are {', '.join(ROPE_TYPES)}"
        )
    if params.get("partial_rotary_factor", 1.0) != 1.0:
        raise UnsupportedConfigError(f"unsupported {field}.partial_rotary_factor: only 1.0 is implemented")

    def need(key):
        if params.get(key) is None:
            raise UnsupportedConfigError(f"{field}.{key} is missing: rope_type {rtype!r} needs it")
        return params[key]

    kw = dict(theta=_number(params.get("rope_theta", 10000.0), f"{field}.rope_theta"), type=rtype)
    if rtype in ("linear", "llama3"):
        kw["factor"] = _number(need("factor"), f"{field}.factor")
    if rtype == "llama3":
        kw["low_freq_factor"] = _number(need("low_freq_factor"), f"{field}.low_freq_factor")
        kw["high_freq_factor"] = _number(need("high_freq_factor"), f"{field}.high_freq_factor")
        kw["original_max_position_embeddings"] = check_size(
            need("original_max_position_embeddings"), f"{field}.original_max_position_embeddings", 1 << 40)
    return RopeConfig(**kw)


def family_of(model_type: str) -> str:
    if not isinstance(model_type, str) or model_type not in _MODEL_TYPES:
        raise UnsupportedConfigError(
            f"unsupported architecture {model_type!r}: supported model types are "
            f"{', '.join(sorted(_MODEL_TYPES))}"
        )
    return _MODEL_TYPES[model_type]


# the attributes of a transformers config that from_hf reads
_HANDLED = frozenset({
    "model_type", "num_hidden_layers", "num_attention_heads", "hidden_size", "head_dim", "num_key_value_heads",
    "hidden_activation", "hidden_act", "use_bidirectional_attention", "layer_types", "use_sliding_window",
    "sliding_window", "max_window_layers", "sliding_window_pattern", "rope_parameters", "rope_scaling",
    "rope_theta", "rope_local_base_freq", "attention_bias", "mlp_bias", "vocab_size", "intermediate_size",
    "rms_norm_eps", "query_pre_attn_scalar", "attn_logit_softcapping", "final_logit_softcapping",
    "tie_word_embeddings", "max_position_embeddings", "bos_token_id", "eos_token_id", "pad_token_id",
})
# attributes that do not change the decoder's forward pass: bookkeeping, training-only
# (dropout, init), transformers' own execution choices (pretraining_tp splits the same
# matmuls; cache_implementation picks a cache class); plus every field of transformers'
# base PretrainedConfig and GenerationConfig (older config.json files carry generation
# settings), added in _ignored()
_IGNORED = frozenset({
    "architectures", "attention_dropout", "initializer_range", "use_cache", "dtype", "torch_dtype",
    "transformers_version", "pretraining_tp", "cache_implementation", "auto_map", "tokenizer_class",
    # transformers 4.x's base config fields, which config.json files written by 4.x carry
    # (none is read by a decoder-only causal LM's forward pass)
    "unk_token_id", "sep_token_id", "cls_token_id", "mask_token_id", "add_cross_attention",
    "cross_attention_hidden_size", "finetuning_task", "is_decoder", "prefix", "pruned_heads",
    "task_specific_params", "tf_legacy_loss", "tie_encoder_decoder", "torchscript", "use_bfloat16",
})


@functools.cache
def _ignored() -> frozenset:
    import transformers

    base = set(transformers.PretrainedConfig().to_dict()) | set(transformers.GenerationConfig().to_dict())
    return frozenset(base - _HANDLED) | _IGNORED


def unknown_attributes(hf_config: Any) -> list[str]:
    """Attributes of a transformers config (object or dict) that from_hf neither reads nor
    knows to be irrelevant to the forward pass."""
    keys = hf_config.keys() if isinstance(hf_config, Mapping) else hf_config.to_dict().keys()
    return sorted(k for k in keys if not k.startswith("_") and k not in _HANDLED and k not in _ignored())


def from_hf(hf_config: Any, strict: bool = True) -> ModelConfig:
    """Build a ModelConfig from a ``transformers`` config (object or dict, v5 field names).

    strict: an attribute that is neither read here nor known to leave the forward pass
    alone (``_HANDLED`` / ``_IGNORED``) is an error naming it, rather than silently
    dropped (a quantization_config, a new attention variant)."""
    model_type = _get(hf_config, "model_type")
    if model_type == "gemma3" and _get(hf_config, "text_config") is not None:
        hf_config = _get(hf_config, "text_config")  # multimodal wrapper: the text decoder only
    family = family_of(model_type)
    if strict and (unknown := unknown_attributes(hf_config)):
        raise UnsupportedConfigError(
            f"{model_type} config attribute(s) {', '.join(unknown)} are not supported (cca_jax would ignore what "
            f"they change); pass strict=False to config.from_hf to load anyway")

    def size(field, default=None):
        value = _get(hf_config, field)
        return default if value is None and default is not None else check_size(value, field, SIZE_LIMITS[field])

    n_layers = size("num_hidden_layers")
    n_heads = size("num_attention_heads")
    hidden = size("hidden_size")
    if _get(hf_config, "head_dim") is None and hidden % n_heads:
        raise UnsupportedConfigError(
            f"hidden_size ({hidden}) is not a multiple of num_attention_heads ({n_heads}) and head_dim is not set"
        )
    head_dim = size("head_dim", hidden // n_heads)
    n_kv = size("num_key_value_heads", n_heads)
    act = _get(hf_config, "hidden_activation") or _get(hf_config, "hidden_act")
    if family in ("gemma2", "gemma3") and _get(hf_config, "hidden_activation") is None:
        act = "gelu_pytorch_tanh"  # transformers' gemma default when unset
    if act == "gelu_pytorch_tanh" or act == "gelu_new":
        act = "gelu_pytorch_tanh"
    for field in ("use_bidirectional_attention",):
        if _get(hf_config, field):
            raise UnsupportedConfigError(f"unsupported config field {field}=True")
    layer_types = _get(hf_config, "layer_types")
    if family == "qwen2" and not _get(hf_config, "use_sliding_window", False):
        layer_types = None  # qwen2 lists layer types but ignores them without use_sliding_window
    if model_type == "mistral" and layer_types is None and _get(hf_config, "sliding_window") is not None:
        layer_types = ["sliding_attention"] * n_layers  # Mistral: one window on every layer
    sliding = tuple(t == "sliding_attention" for t in layer_types) if layer_types else ()
    for t in layer_types or ():
        if t not in ("sliding_attention", "full_attention"):
            raise UnsupportedConfigError(f"unsupported layer_types entry {t!r}")
    window = _get(hf_config, "sliding_window") if any(sliding) else None
    if window is not None:
        check_size(window, "sliding_window", _WINDOW_LIMIT)

    rope_params = _get(hf_config, "rope_parameters")
    if rope_params is None:  # transformers < 5 field names
        rope_params = dict(_get(hf_config, "rope_scaling") or {})
        rope_params.setdefault("rope_theta", _get(hf_config, "rope_theta", 10000.0))
    rope_local = None
    if family == "gemma3":
        if "full_attention" in rope_params:
            rope = _rope_from_params(rope_params["full_attention"], "rope_parameters.full_attention")
            rope_local = _rope_from_params(rope_params.get("sliding_attention"), "rope_parameters.sliding_attention")
        else:
            rope = _rope_from_params(rope_params, "rope_parameters")
            rope_local = RopeConfig(theta=float(_get(hf_config, "rope_local_base_freq", 10000.0)))
    else:
        rope = _rope_from_params(rope_params, "rope_parameters")

    gemma = family in ("gemma2", "gemma3")
    attention_bias = bool(_get(hf_config, "attention_bias", False))
    eos = _get(hf_config, "eos_token_id")
    kw = dict(
        family=family,
        vocab_size=size("vocab_size"),
        hidden_size=hidden,
        num_layers=n_layers,
        num_heads=n_heads,
        num_kv_heads=n_kv,
        head_dim=head_dim,
        intermediate_size=size("intermediate_size"),
        rms_norm_eps=_number(_get(hf_config, "rms_norm_eps", 1e-6), "rms_norm_eps"),
        hidden_act=act,
        qkv_bias=(family == "qwen2") or attention_bias,
        o_bias=attention_bias and family != "qwen2",
        mlp_bias=bool(_get(hf_config, "mlp_bias", False)),
        norm_plus_one=gemma,
        pre_attn_norm=family != "olmo2",
        post_attn_norm=gemma or family == "olmo2",
        pre_mlp_norm=family != "olmo2",
        post_mlp_norm=gemma or family == "olmo2",
        qk_norm={"gemma3": "head", "olmo2": "full"}.get(family),
        embed_scale=gemma,
        query_pre_attn_scalar=_get(hf_config, "query_pre_attn_scalar") if gemma else None,
        attn_logit_softcap=_get(hf_config, "attn_logit_softcapping") if gemma else None,
        final_logit_softcap=_get(hf_config, "final_logit_softcapping") if gemma else None,
        sliding_window=int(window) if window else None,
        sliding_layers=sliding or (False,) * n_layers,
        rope=rope,
        rope_local=rope_local,
        tie_word_embeddings=bool(_get(hf_config, "tie_word_embeddings", False)),
        max_position_embeddings=size("max_position_embeddings", 8192),
        bos_token_id=_get(hf_config, "bos_token_id"),
        eos_token_id=tuple(eos) if isinstance(eos, (list, tuple)) else eos,
        pad_token_id=_get(hf_config, "pad_token_id"),
    )
    return ModelConfig(**kw)


def to_hf(cfg: ModelConfig) -> Any:
    """The ``transformers`` config that describes the same model (used by export)."""
    import transformers

    def rope_dict(r: RopeConfig) -> dict:
        d = {"rope_type": r.type, "rope_theta": r.theta}
        if r.type in ("linear", "llama3"):
            d["factor"] = r.factor
        if r.type == "llama3":
            d.update(
                low_freq_factor=r.low_freq_factor,
                high_freq_factor=r.high_freq_factor,
                original_max_position_embeddings=r.original_max_position_embeddings,
            )
        return d

    common = dict(
        vocab_size=cfg.vocab_size,
        hidden_size=cfg.hidden_size,
        intermediate_size=cfg.intermediate_size,
        num_hidden_layers=cfg.num_layers,
        num_attention_heads=cfg.num_heads,
        num_key_value_heads=cfg.num_kv_heads,
        head_dim=cfg.head_dim,
        rms_norm_eps=cfg.rms_norm_eps,
        max_position_embeddings=cfg.max_position_embeddings,
        tie_word_embeddings=cfg.tie_word_embeddings,
        bos_token_id=cfg.bos_token_id,
        eos_token_id=list(cfg.eos_token_id) if isinstance(cfg.eos_token_id, tuple) else cfg.eos_token_id,
        pad_token_id=cfg.pad_token_id,
        rope_parameters=rope_dict(cfg.rope),
    )
    layer_types = ["sliding_attention" if s else "full_attention" for s in cfg.sliding_layers]
    f = cfg.family
    if f == "llama":
        c = transformers.LlamaConfig(
            **common, hidden_act=cfg.hidden_act, attention_bias=cfg.qkv_bias, mlp_bias=cfg.mlp_bias
        )
    elif f == "qwen2":
        c = transformers.Qwen2Config(
            **common,
            hidden_act=cfg.hidden_act,
            use_sliding_window=any(cfg.sliding_layers),
            sliding_window=cfg.sliding_window,
            layer_types=layer_types,
        )
    elif f == "olmo2":
        c = transformers.Olmo2Config(**common, hidden_act=cfg.hidden_act)
    elif f in ("gemma2", "gemma3"):
        gemma = dict(
            hidden_activation=cfg.hidden_act,
            query_pre_attn_scalar=cfg.query_pre_attn_scalar or cfg.head_dim,
            attn_logit_softcapping=cfg.attn_logit_softcap,
            final_logit_softcapping=cfg.final_logit_softcap,
            sliding_window=cfg.sliding_window or 4096,
            layer_types=layer_types,
        )
        if f == "gemma2":
            c = transformers.Gemma2Config(**common, **gemma)
        else:
            common["rope_parameters"] = {
                "full_attention": rope_dict(cfg.rope),
                "sliding_attention": rope_dict(cfg.rope_local or cfg.rope),
            }
            c = transformers.Gemma3TextConfig(**common, **gemma)
    else:  # pragma: no cover - ModelConfig validates family
        raise UnsupportedConfigError(f"cannot export family {f!r}")
    c.architectures = [type(c).__name__.replace("Config", "ForCausalLM").replace("TextFor", "For")]
    return c


def parse_dtype(name: Any):
    """'float32' | 'bfloat16' | 'float16' (or a jnp dtype) -> jnp dtype, with a clear error."""
    import jax.numpy as jnp

    if not isinstance(name, str):
        name = jnp.dtype(name).name
    aliases = {"fp32": "float32", "f32": "float32", "bf16": "bfloat16", "fp16": "float16", "f16": "float16"}
    name = aliases.get(name, name)
    if name not in DTYPES:
        raise CCAError(f"unknown dtype {name!r}: use one of {', '.join(DTYPES)}")
    return jnp.dtype(name)


