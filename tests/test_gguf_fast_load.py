"""GGUF loads through the device dequantizers and the load cache: the same parameters,
config and tokenizer as the host path (gguf's numpy dequantizer, transformers' converter)."""

import json

import gguf
import jax
import numpy as np
import pytest

import cca_jax
import tiny
from cca_jax import config as config_lib
from cca_jax.weights import assemble as assemble_lib
from cca_jax.weights import gguf as gguf_lib
from cca_jax.weights import gguf_assemble, gguf_cache

_NORMS = {"llama": ["attn_norm", "ffn_norm"],
          "gemma2": ["attn_norm", "post_attention_norm", "ffn_norm", "post_ffw_norm"]}


def _write(path, arch, formats):
    """A 2-layer GGUF (hidden 32, 2 heads of 16, 1 kv head, ffn 64); ``formats`` maps a
    tensor-name suffix to a GGML format per layer (mixed formats in one parameter)."""
    w = tiny.gguf_writer(path, arch, layers=2, hidden=32, ffn=64, vocab=64, head_dim=16)
    rng = np.random.default_rng(1)
    shapes = [("token_embd.weight", (64, 32)), ("output_norm.weight", (32,))]
    for i in range(2):
        shapes += [(f"blk.{i}.{n}.weight", (32,)) for n in _NORMS[arch]]
        shapes += [(f"blk.{i}.attn_q.weight", (32, 32)), (f"blk.{i}.attn_k.weight", (16, 32)),
                   (f"blk.{i}.attn_v.weight", (16, 32)), (f"blk.{i}.attn_output.weight", (32, 32)),
                   (f"blk.{i}.ffn_gate.weight", (64, 32)), (f"blk.{i}.ffn_up.weight", (64, 32)),
                   (f"blk.{i}.ffn_down.weight", (32, 64))]
    for name, shape in shapes:
        x = rng.standard_normal(shape).astype(np.float32)
        layer = int(name.split(".")[1]) if name.startswith("blk.") else 0
        fmt = next((f[layer] for suffix, f in formats.items() if name.endswith(suffix)), "F32")
        if fmt == "F32":
            w.add_tensor(name, x)
        elif fmt == "F16":
            w.add_tensor(name, x.astype(np.float16))
        else:
            qtype = gguf.GGMLQuantizationType[fmt]
            w.add_tensor(name, gguf.quants.quantize(x, qtype), raw_dtype=qtype)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


FORMATS = {"attn_q.weight": ("Q8_0", "Q4_0"), "attn_k.weight": ("Q5_0", "Q5_0"),
           "attn_v.weight": ("Q4_1", "Q8_0"), "attn_output.weight": ("Q5_1", "BF16"),
           "ffn_gate.weight": ("F16", "Q8_0"), "ffn_up.weight": ("Q8_0", "Q8_0"),
           "ffn_down.weight": ("Q4_0", "Q5_1"), "token_embd.weight": ("Q8_0",),
           "post_ffw_norm.weight": ("F16", "F32")}


def _host_params(path, dtype):
    """The host path: gguf's reader and numpy dequantizer, assembled on the host."""
    reader = gguf_lib.reader(path)
    hf, arch = gguf_lib.hf_config(reader, path)
    cfg = config_lib.from_hf(hf)
    return cfg, arch, reader, assemble_lib.assemble(cfg, gguf_lib.iter_tensors(reader, cfg, arch, path), dtype, str(path))


@pytest.mark.parametrize("arch", ["llama", "gemma2"])
@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_device_assembly_equals_host_assembly(tmp_path, arch, dtype):
    """Mixed formats within a parameter, llama's q/k un-permuting and gemma's (1 + w)
    norms (one in float16, so on the device): bit for bit, and also through a placer (a
    mesh's path: every leaf assembled on the host)."""
    path = _write(tmp_path / f"{arch}.gguf", arch, FORMATS)
    cfg, arch_, reader, want = _host_params(path, config_lib.parse_dtype(dtype))
    records = gguf_lib.records(reader, cfg, arch_, path)
    assert {r["format"] for r in records} >= {"Q8_0", "Q4_0", "Q5_0", "Q4_1", "Q5_1", "BF16", "F16", "F32"}
    assert any(r["fixup"] for r in records)
    dt = config_lib.parse_dtype(dtype)
    for put in (None, lambda p, x: jax.device_put(x)):
        got = gguf_assemble.assemble(cfg, records, path, dt, str(path), put)
        assert jax.tree.structure(got) == jax.tree.structure(want)
        for (kp, a), b in zip(jax.tree_util.tree_leaves_with_path(got), jax.tree.leaves(want)):
            assert a.dtype == b.dtype and a.shape == b.shape, kp
            np.testing.assert_array_equal(np.asarray(a, np.float32), np.asarray(b, np.float32), err_msg=str(kp))


def test_truncated_file_is_one_clear_error(tmp_path):
    path = _write(tmp_path / "t.gguf", "llama", FORMATS)
    reader = gguf_lib.reader(path)
    hf, arch = gguf_lib.hf_config(reader, path)
    cfg = config_lib.from_hf(hf)
    records = gguf_lib.records(reader, cfg, arch, path)
    records[-1] = dict(records[-1], offset=path.stat().st_size)
    with pytest.raises(cca_jax.CCAError, match="past the end of the file: the file is truncated"):
        gguf_assemble.assemble(cfg, records, path, np.float32, str(path))


def test_second_load_comes_from_the_cache_and_equals_the_first(tmp_path, monkeypatch):
    """SmolLM2 (a real tokenizer): the first load writes the cache, the second reads it
    without parsing the file or converting the tokenizer, and both give the same config,
    weights and tokenizer. A changed file is not served from the cache."""
    src = tiny.smollm2_path()
    monkeypatch.setenv("CCA_JAX_GGUF_CACHE", str(tmp_path / "cache"))
    first, tok1 = cca_jax.load_model(src)
    (entry,) = (tmp_path / "cache").iterdir()
    assert (entry / "model.json").is_file() and (entry / "tokenizer" / "tokenizer.json").is_file()

    def no_parse(*a, **k):
        raise AssertionError("the cached load parsed the GGUF file")

    with monkeypatch.context() as m:
        m.setattr(gguf_lib, "reader", no_parse)
        m.setattr(gguf_lib, "load_tokenizer", no_parse)
        second, tok2 = cca_jax.load_model(src)
    assert second.config == first.config
    for a, b in zip(jax.tree.leaves(second.params()), jax.tree.leaves(first.params())):
        np.testing.assert_array_equal(np.asarray(a, np.float32), np.asarray(b, np.float32))
    assert type(tok2) is type(tok1) and tok2.get_vocab() == tok1.get_vocab()
    assert (tok2.bos_token, tok2.eos_token, tok2.pad_token, tok2.chat_template) == (
        tok1.bos_token, tok1.eos_token, tok1.pad_token, tok1.chat_template)
    text = "Janet's ducks lay 16 eggs. 16 - 3 - 4 = <<16-3-4=9>>9 \u00e9\u65e5 <|im_end|>\n#### 9"
    assert tok2(text).input_ids == tok1(text).input_ids
    chat = [{"role": "user", "content": "What is 2 + 3?"}]
    assert tok2.apply_chat_template(chat, tokenize=False, add_generation_prompt=True) == \
        tok1.apply_chat_template(chat, tokenize=False, add_generation_prompt=True)

    # an entry that does not fit the file (edited by hand) is not used: the file is parsed
    meta_path = entry / "model.json"
    good = meta_path.read_text()
    bad = json.loads(good)
    bad["records"][0]["offset"] = src.stat().st_size
    meta_path.write_text(json.dumps(bad))
    assert gguf_cache.read(src) is None
    third, _ = cca_jax.load_model(src, with_tokenizer=False)
    np.testing.assert_array_equal(np.asarray(third.params()["embed"], np.float32),
                                  np.asarray(first.params()["embed"], np.float32))
    meta_path.write_text(good)

    # a copy elsewhere is another file (path in the key); so is a touched one
    copy = tmp_path / "copy.gguf"
    copy.write_bytes(src.read_bytes())
    assert gguf_cache.read(copy) is None
    assert gguf_cache.read(src) is not None


def test_cache_off_and_unwritable_cache_still_load(tmp_path, monkeypatch, capsys):
    path = tiny.write_gguf(tmp_path / "ok.gguf")
    monkeypatch.setenv("CCA_JAX_GGUF_CACHE", "off")
    assert gguf_cache.root() is None
    cca_jax.load_model(path)
    blocker = tmp_path / "file"
    blocker.write_text("not a directory")
    monkeypatch.setenv("CCA_JAX_GGUF_CACHE", str(blocker / "cache"))
    model, _ = cca_jax.load_model(path)
    assert model.config.num_layers == 1
    assert "GGUF load cache not written" in capsys.readouterr().err


def test_a_prefetched_tokenizer_is_the_one_load_model_returns(tmp_path, monkeypatch):
    """A run starts reading a cached GGUF's tokenizer before its setup (prefetch_tokenizer);
    load_model then takes that one, and reads none itself."""
    from cca_jax import load

    src = tiny.smollm2_path()
    monkeypatch.setenv("CCA_JAX_GGUF_CACHE", str(tmp_path / "cache"))
    load.prefetch_tokenizer(str(src))  # nothing cached yet: nothing started
    assert not load._PREFETCHED
    cca_jax.load_model(src, with_tokenizer=True)
    load.prefetch_tokenizer(str(src))
    (job,) = load._PREFETCHED.values()
    calls = []
    monkeypatch.setattr(gguf_cache, "tokenizer", lambda folder: calls.append(folder))
    _, tok = cca_jax.load_model(src)
    assert tok is job.result() and tok is not None and not calls and not load._PREFETCHED


def test_a_cache_entry_written_meanwhile_by_another_process_is_no_failure(tmp_path, monkeypatch, capsys):
    """Two processes loading one file at once: the rename that loses finds the winner's
    entry, says nothing and leaves no scratch folder."""
    path = tiny.write_gguf(tmp_path / "ok.gguf")
    monkeypatch.setenv("CCA_JAX_GGUF_CACHE", str(tmp_path / "cache"))
    model, _ = cca_jax.load_model(path, with_tokenizer=False)  # nothing written without a tokenizer
    assert not (tmp_path / "cache").exists()

    def lose(src, dst):
        dst.mkdir(parents=True)
        (dst / "model.json").write_text("{}")  # the other process's entry
        raise OSError(39, "Directory not empty")

    monkeypatch.setattr(gguf_cache.os, "rename", lose)
    folder = gguf_cache.write(path, model.config, "llama", [], "float32", None)
    assert folder is not None and (folder / "model.json").is_file()
    assert "not written" not in capsys.readouterr().err
    assert [p.name for p in (tmp_path / "cache").iterdir()] == [folder.name]
