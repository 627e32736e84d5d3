"""One table per family: Hugging Face tensor name <-> parameter path, used both ways.

A row is (HF name template, our path, transform). ``{i}`` stands for the layer index;
per-layer tensors fill row i of a stacked (L, ...) parameter. Transforms turn HF's
``nn.Linear`` (out, in) matrices into our component-wise layout and back.
GGUF files are read through the same table: the ``gguf`` package's own name map turns
each HF name into its GGUF name (see ``gguf_names``).
"""

from __future__ import annotations

import dataclasses
import re
from typing import Iterator

import numpy as np

from cca_jax.config import ModelConfig
from cca_jax.model.transformer import param_shapes

# Rows shared by every family; the norm rows differ per family (below).
_ATTN = [
    ("model.layers.{i}.self_attn.q_proj.weight", ("layers", "attn", "q"), "proj"),
    ("model.layers.{i}.self_attn.k_proj.weight", ("layers", "attn", "k"), "proj"),
    ("model.layers.{i}.self_attn.v_proj.weight", ("layers", "attn", "v"), "proj"),
    ("model.layers.{i}.self_attn.o_proj.weight", ("layers", "attn", "o"), "out_proj"),
    ("model.layers.{i}.self_attn.q_proj.bias", ("layers", "attn", "q_bias"), "reshape"),
    ("model.layers.{i}.self_attn.k_proj.bias", ("layers", "attn", "k_bias"), "reshape"),
    ("model.layers.{i}.self_attn.v_proj.bias", ("layers", "attn", "v_bias"), "reshape"),
    ("model.layers.{i}.self_attn.o_proj.bias", ("layers", "attn", "o_bias"), "copy"),
    ("model.layers.{i}.self_attn.q_norm.weight", ("layers", "attn", "q_norm"), "reshape"),
    ("model.layers.{i}.self_attn.k_norm.weight", ("layers", "attn", "k_norm"), "reshape"),
]
_MLP = [
    ("model.layers.{i}.mlp.gate_proj.weight", ("layers", "mlp", "gate"), "transpose"),
    ("model.layers.{i}.mlp.up_proj.weight", ("layers", "mlp", "up"), "transpose"),
    ("model.layers.{i}.mlp.down_proj.weight", ("layers", "mlp", "down"), "transpose"),
    ("model.layers.{i}.mlp.gate_proj.bias", ("layers", "mlp", "gate_bias"), "copy"),
    ("model.layers.{i}.mlp.up_proj.bias", ("layers", "mlp", "up_bias"), "copy"),
    ("model.layers.{i}.mlp.down_proj.bias", ("layers", "mlp", "down_bias"), "copy"),
]
_GLOBAL = [
    ("model.embed_tokens.weight", ("embed",), "copy"),
    ("model.norm.weight", ("final_norm",), "copy"),
    ("lm_head.weight", ("lm_head",), "transpose"),
]
_NORMS = {
    # llama-style: "post_attention_layernorm" is the norm BEFORE the MLP.
    "pre": [
        ("model.layers.{i}.input_layernorm.weight", ("layers", "attn_norm"), "copy"),
        ("model.layers.{i}.post_attention_layernorm.weight", ("layers", "mlp_norm"), "copy"),
    ],
    "gemma": [
        ("model.layers.{i}.input_layernorm.weight", ("layers", "attn_norm"), "copy"),
        ("model.layers.{i}.post_attention_layernorm.weight", ("layers", "post_attn_norm"), "copy"),
        ("model.layers.{i}.pre_feedforward_layernorm.weight", ("layers", "mlp_norm"), "copy"),
        ("model.layers.{i}.post_feedforward_layernorm.weight", ("layers", "post_mlp_norm"), "copy"),
    ],
    "olmo2": [
        ("model.layers.{i}.post_attention_layernorm.weight", ("layers", "post_attn_norm"), "copy"),
        ("model.layers.{i}.post_feedforward_layernorm.weight", ("layers", "post_mlp_norm"), "copy"),
    ],
}
_FAMILY_NORMS = {"llama": "pre", "qwen2": "pre", "gemma2": "gemma", "gemma3": "gemma", "olmo2": "olmo2"}

# Prefixes of other checkpoint layouts (multimodal gemma3) mapped onto "model.".
_PREFIXES = [(re.compile(r"^(model\.language_model\.|language_model\.model\.)"), "model.")]
# Tensors some checkpoints carry that the model recomputes or does not use.
_IGNORED = re.compile(r"(rotary_emb\.inv_freq$|^vision_tower\.|^model\.vision_tower\.|multi_modal_projector\.)")


@dataclasses.dataclass(frozen=True)
class Entry:
    hf_name: str
    path: tuple[str, ...]
    layer: int | None
    transform: str
    shape: tuple[int, ...]  # our per-layer (or global) shape


def canonical_name(name: str) -> str:
    for pat, repl in _PREFIXES:
        name = pat.sub(repl, name)
    if name.startswith("language_model.lm_head."):
        name = name[len("language_model."):]
    return name


def is_ignored(name: str) -> bool:
    return bool(_IGNORED.search(name))


def entries(cfg: ModelConfig) -> Iterator[Entry]:
    """Every HF tensor the model has, with where it goes."""
    shapes = param_shapes(cfg)

    def lookup(path):
        node = shapes
        for p in path:
            if not isinstance(node, dict) or p not in node:
                return None
            node = node[p]
        return node

    rows = _GLOBAL + _NORMS[_FAMILY_NORMS[cfg.family]] + _ATTN + _MLP
    for template, path, transform in rows:
        shape = lookup(path)
        if shape is None:
            continue  # this config has no such parameter (biases, q/k norms, untied head)
        if "{i}" in template:
            for i in range(cfg.num_layers):
                yield Entry(template.format(i=i), path, i, transform, tuple(shape[1:]))
        else:
            yield Entry(template, path, None, transform, tuple(shape))


def to_ours(x: np.ndarray, e: Entry) -> np.ndarray:
    """An HF tensor -> our layout (shape ``e.shape``)."""
    if e.transform in ("proj", "out_proj", "transpose"):
        x = x.T
    return np.ascontiguousarray(x.reshape(e.shape))


def to_hf(x: np.ndarray, e: Entry) -> np.ndarray:
    """Our tensor -> the HF layout (inverse of ``to_ours``)."""
    if e.transform == "proj":  # (D, N, Dh) -> (N*Dh, D)
        return np.ascontiguousarray(x.reshape(x.shape[0], -1).T)
    if e.transform == "out_proj":  # (H, Dh, D) -> (D, H*Dh)
        return np.ascontiguousarray(x.reshape(-1, x.shape[-1]).T)
    if e.transform == "transpose":
        return np.ascontiguousarray(x.T)
    return np.ascontiguousarray(x.reshape(-1)) if e.transform == "reshape" else x


def gguf_names(cfg: ModelConfig, arch: str) -> dict[str, str]:
    """GGUF tensor name -> HF name, from the ``gguf`` package's own name map."""
    import gguf

    arch_id = next((k for k, v in gguf.MODEL_ARCH_NAMES.items() if v == arch), None)
    name_map = gguf.get_tensor_name_map(arch_id, cfg.num_layers)
    out = {}
    for e in entries(cfg):
        base, suffix = e.hf_name.rsplit(".", 1)
        g = name_map.get_name(base)
        if g is not None:
            out[f"{g}.{suffix}"] = e.hf_name
    return out
