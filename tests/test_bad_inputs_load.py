"""Bad input to `export` and to loading: one line, exit status 2, nothing written or deleted."""

import json
import re
import shutil
import time
from pathlib import Path

import gguf
import numpy as np
import pytest
from safetensors import safe_open
from safetensors.numpy import save_file

import tiny
from cca_jax import atomic, cli

TINY_YAML = str(Path(__file__).resolve().parents[1] / "configs" / "models" / "tiny-llama.yaml")


def one_line_error(argv, capsys) -> str:
    return tiny.cli_error(capsys, argv)


def snapshot(folder: Path) -> list:
    """Every path under ``folder`` with its size and modification time."""
    return sorted((str(p.relative_to(folder)), p.lstat().st_size, p.lstat().st_mtime_ns)
                  for p in folder.rglob("*"))


def hf_copy(hf_dirs, dest: Path, family: str = "llama") -> Path:
    shutil.copytree(hf_dirs[family][1], dest)
    return dest


def rewrite_tensors(directory: Path, change) -> None:
    """Rewrite model.safetensors with ``change(name, array)`` applied to every tensor."""
    f = directory / "model.safetensors"
    with safe_open(str(f), framework="numpy") as st:
        tensors = {k: change(k, st.get_tensor(k)) for k in st.keys()}
    save_file(tensors, str(f), metadata={"format": "pt"})


def edit_config(directory: Path, **fields) -> None:
    cfg = json.loads((directory / "config.json").read_text())
    cfg.update(fields)
    (directory / "config.json").write_text(json.dumps(cfg))


# -- export: never into what it did not write ------------------------------------------------


def test_export_refuses_an_unrelated_folder(tmp_path, capsys):
    d = tmp_path / "d"
    d.mkdir()
    (d / "notes.txt").write_text("keep\n")
    before = snapshot(tmp_path)
    err = one_line_error(["export", TINY_YAML, str(d)], capsys)
    assert "not empty" in err and str(d) in err and atomic.MARKER in err
    assert (d / "notes.txt").read_text() == "keep\n"
    assert snapshot(tmp_path) == before  # no temporary copy next to it either


def test_export_refuses_the_current_folder_its_parents_and_home(tmp_path, capsys, monkeypatch):
    work = tmp_path / "work"
    work.mkdir()
    (work / "precious.txt").write_text("mine")
    home = tmp_path / "home"
    home.mkdir()
    monkeypatch.chdir(work)
    monkeypatch.setenv("HOME", str(home))
    before = snapshot(tmp_path)
    for target in (".", "..", str(work), "/", "~", str(home)):
        err = one_line_error(["export", TINY_YAML, target], capsys)
        assert "refusing to export into" in err and ("current folder" in err or "home folder" in err)
    assert snapshot(tmp_path) == before


def test_export_refuses_a_file_and_a_path_below_a_file(tmp_path, capsys):
    f = tmp_path / "model.txt"
    f.write_text("not a folder")
    before = snapshot(tmp_path)
    assert "is not a folder" in one_line_error(["export", TINY_YAML, str(f)], capsys)
    assert "is a file, not a folder" in one_line_error(["export", TINY_YAML, str(f / "sub")], capsys)
    assert snapshot(tmp_path) == before


def test_export_refuses_an_earlier_export_holding_a_foreign_file(tmp_path, capsys):
    out = tmp_path / "out"
    assert cli.main(["export", TINY_YAML, str(out)]) == 0
    assert (out / atomic.MARKER).is_file()
    (out / "notes.txt").write_text("added by hand")
    capsys.readouterr()
    before = snapshot(tmp_path)
    err = one_line_error(["export", TINY_YAML, str(out)], capsys)
    assert "'notes.txt'" in err
    assert snapshot(tmp_path) == before


def test_export_refuses_a_symlink(tmp_path, capsys):
    real = tmp_path / "real"
    real.mkdir()
    (tmp_path / "link").symlink_to(real)
    before = snapshot(tmp_path)
    assert "is not a folder" in one_line_error(["export", TINY_YAML, str(tmp_path / "link")], capsys)
    assert snapshot(tmp_path) == before


def test_export_into_new_empty_and_earlier_export(tmp_path, capsys):
    empty = tmp_path / "empty"
    empty.mkdir()
    for target in (tmp_path / "new" / "deeper", empty, empty):  # the last one replaces an export
        assert cli.main(["export", TINY_YAML, str(target)]) == 0
        listed = json.loads((target / atomic.MARKER).read_text())["files"]
        assert sorted(p.name for p in target.iterdir()) == sorted(listed + [atomic.MARKER])
    assert sorted(p.name for p in tmp_path.iterdir()) == ["empty", "new"]


def test_abandoned_scratch_folders_are_removed_only_when_ours(tmp_path):
    target = tmp_path / "out"
    name = ".out.cca_jax-partial-"
    ours = tmp_path / f"{name}0123456789abcdef"  # what a SIGKILLed export leaves
    ours.mkdir()
    (ours / atomic.MARKER).write_text(json.dumps({"format": "cca_jax export", "version": 1, "complete": False}))
    (ours / "model.safetensors").write_bytes(b"half")
    empty = tmp_path / f"{name}00000000000000ff"  # killed right after its mkdir
    empty.mkdir()
    lookalike = tmp_path / f"{name}fedcba9876543210"  # same pattern, no marker: not ours
    lookalike.mkdir()
    (lookalike / "data.bin").write_text("someone else's")
    other = tmp_path / ".other.cca_jax-partial-0123456789abcdef"  # another target's
    shutil.copytree(ours, other)
    with atomic.directory(target) as scratch:
        (scratch / "x.txt").write_text("new")
    assert not ours.exists() and not empty.exists()
    assert (lookalike / "data.bin").read_text() == "someone else's"
    assert (other / "model.safetensors").exists()
    assert (target / "x.txt").read_text() == "new"


def test_a_failing_export_leaves_the_earlier_one(tmp_path):
    target = tmp_path / "out"
    with atomic.directory(target) as scratch:
        (scratch / "x.txt").write_text("old")
    before = snapshot(tmp_path)
    with pytest.raises(RuntimeError, match="writer failed"):
        with atomic.directory(target) as scratch:
            (scratch / "x.txt").write_text("new")
            raise RuntimeError("writer failed")
    assert snapshot(tmp_path) == before


# -- loading: exact shapes --------------------------------------------------------------------


def test_transposed_up_proj_is_refused(tmp_path, hf_dirs, capsys):
    d = hf_copy(hf_dirs, tmp_path / "m")
    name = "model.layers.1.mlp.up_proj.weight"
    rewrite_tensors(d, lambda k, x: np.ascontiguousarray(x.T) if k == name else x)
    before = snapshot(tmp_path)
    err = one_line_error(["info", str(d)], capsys)
    # tiny: hidden 48, intermediate 80 -> HF's up_proj is (80, 48)
    assert f"'{name}'" in err and "(48, 80)" in err and "expected (80, 48)" in err
    assert snapshot(tmp_path) == before


def test_transposed_square_attention_output_is_refused(tmp_path, hf_dirs, capsys):
    """o_proj is (D, H*Dh) = (48, 64): its transpose has the right size, the wrong shape."""
    d = hf_copy(hf_dirs, tmp_path / "m", "qwen2")
    name = "model.layers.0.self_attn.o_proj.weight"
    rewrite_tensors(d, lambda k, x: np.ascontiguousarray(x.T) if k == name else x)
    err = one_line_error(["info", str(d)], capsys)
    assert f"'{name}'" in err and "(64, 48)" in err and "expected (48, 64)" in err


def test_config_that_does_not_match_the_weights(tmp_path, hf_dirs, capsys):
    d = hf_copy(hf_dirs, tmp_path / "m")
    edit_config(d, intermediate_size=40)
    err = one_line_error(["info", str(d)], capsys)
    assert re.search(r"mlp\.\w+_proj\.weight' has shape \((48, 80|80, 48)\), expected \((48, 40|40, 48)\)", err), err


def write_gguf(path: Path, up_shape=(16, 8)) -> Path:
    return tiny.write_gguf(path, up_shape=up_shape)


def test_gguf_transposed_tensor_is_refused(tmp_path, capsys):
    assert cli.main(["info", str(write_gguf(tmp_path / "ok.gguf"))]) == 0  # the layout the reader expects
    capsys.readouterr()
    bad = write_gguf(tmp_path / "bad.gguf", up_shape=(8, 16))
    err = one_line_error(["info", str(bad)], capsys)
    assert "'model.layers.0.mlp.up_proj.weight'" in err and "(8, 16)" in err and "expected (16, 8)" in err


# -- loading: damaged files, hostile indexes ----------------------------------------------------


def test_truncated_safetensors(tmp_path, hf_dirs, capsys):
    d = hf_copy(hf_dirs, tmp_path / "m")
    f = d / "model.safetensors"
    with open(f, "r+b") as fh:
        fh.truncate(f.stat().st_size // 2)
    before = snapshot(tmp_path)
    err = one_line_error(["info", str(d)], capsys)
    assert str(f) in err and "truncated or damaged" in err
    with open(f, "r+b") as fh:
        fh.truncate(5)  # not even a header
    assert "truncated or damaged" in one_line_error(["info", str(d)], capsys)
    assert snapshot(tmp_path) != before  # (only by our own truncate above)


@pytest.mark.parametrize("shard", ["../../../../etc/passwd", "/etc/passwd", "sub/../../outside.safetensors"])
def test_index_pointing_outside_the_model_dir(tmp_path, hf_dirs, capsys, shard):
    d = hf_copy(hf_dirs, tmp_path / "m")
    (d / "model.safetensors").rename(d / "model-00001-of-00001.safetensors")
    (d / "model.safetensors.index.json").write_text(json.dumps(
        {"metadata": {}, "weight_map": {"model.embed_tokens.weight": shard,
                                         "model.norm.weight": "model-00001-of-00001.safetensors"}}))
    err = one_line_error(["info", str(d)], capsys)
    assert "points outside the model directory" in err and repr(shard) in err


def test_shard_symlink_escaping_the_model_dir(tmp_path, hf_dirs, capsys):
    d = hf_copy(hf_dirs, tmp_path / "m")
    outside = tmp_path / "elsewhere.safetensors"
    (d / "model.safetensors").rename(outside)
    (d / "model.safetensors").symlink_to(outside)
    err = one_line_error(["info", str(d)], capsys)
    assert "outside the model directory" in err and str(outside) in err


def test_index_that_is_not_an_index(tmp_path, hf_dirs, capsys):
    d = hf_copy(hf_dirs, tmp_path / "m")
    (d / "model.safetensors.index.json").write_text("[1, 2]")
    assert "expected a JSON object" in one_line_error(["info", str(d)], capsys)
    (d / "model.safetensors.index.json").write_text(json.dumps({"weight_map": {"a": 3}}))
    assert "not a valid safetensors index" in one_line_error(["info", str(d)], capsys)


# -- loading: configs --------------------------------------------------------------------------


@pytest.mark.parametrize("fields, words", [
    ({"num_attention_heads": 0}, "num_attention_heads must be a whole number from 1"),
    ({"num_hidden_layers": 1e8}, "num_hidden_layers must be a whole number from 1 to 4096, got 100000000.0"),
    ({"num_hidden_layers": 100_000_000}, "num_hidden_layers must be a whole number from 1 to 4096"),
    ({"hidden_size": -48}, "hidden_size must be a whole number"),
    ({"num_key_value_heads": True}, "num_key_value_heads must be a whole number"),
    ({"vocab_size": "96"}, "vocab_size must be a whole number"),
    ({"num_attention_heads": 5, "head_dim": None}, "not a multiple of the number of attention heads"),
    ({"num_key_value_heads": 3}, "must be a multiple of num_key_value_heads"),
])
def test_bad_config_numbers_are_one_line_and_fast(tmp_path, hf_dirs, capsys, fields, words):
    d = hf_copy(hf_dirs, tmp_path / "m")
    edit_config(d, **fields)
    t0 = time.perf_counter()
    err = one_line_error(["info", str(d)], capsys)
    assert time.perf_counter() - t0 < 60  # bounded (hours or no end without the limit), with room for a slow machine
    assert words in err


def test_more_layers_than_the_weights_hold_fails_before_allocating(tmp_path, hf_dirs, capsys, monkeypatch):
    d = hf_copy(hf_dirs, tmp_path / "m")
    edit_config(d, num_hidden_layers=4000, layer_types=None)
    monkeypatch.setattr(np, "empty", lambda *a, **k: pytest.fail("allocated before checking"))
    err = one_line_error(["info", str(d)], capsys)
    assert "missing tensors model.layers.10." in err or "missing tensors model.layers.3." in err


def test_config_json_not_utf8_or_not_an_object(tmp_path, hf_dirs, capsys):
    d = hf_copy(hf_dirs, tmp_path / "m")
    (d / "config.json").write_bytes(b'{"model_type": "llama\xff\xfe"}')
    err = one_line_error(["info", str(d)], capsys)
    assert "config.json: not UTF-8" in err
    for text in ("[1, 2]", '"llama"', "null"):
        (d / "config.json").write_text(text)
        assert "expected a JSON object" in one_line_error(["info", str(d)], capsys)
    (d / "config.json").write_text(json.dumps({"model_type": ["llama"]}))
    assert "unsupported architecture" in one_line_error(["info", str(d)], capsys)


def test_rope_parameters_missing_a_key(tmp_path, hf_dirs, capsys):
    d = hf_copy(hf_dirs, tmp_path / "m")
    cfg = json.loads((d / "config.json").read_text())
    rope = {k: v for k, v in cfg["rope_parameters"].items() if k != "low_freq_factor"}
    edit_config(d, rope_parameters=rope)
    err = one_line_error(["info", str(d)], capsys)
    assert "low_freq_factor" in err


def header_only_gguf(path: Path, blocks=1, heads=2, vocab=32) -> Path:
    """A llama GGUF with metadata and one embedding tensor: enough to reach the config checks."""
    w = gguf.GGUFWriter(str(path), "llama")
    w.add_block_count(blocks)
    w.add_embedding_length(8)
    w.add_feed_forward_length(16)
    w.add_head_count(heads)
    if vocab is not None:
        w.add_vocab_size(vocab)
    w.add_tensor("token_embd.weight", np.zeros((32, 8), np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


@pytest.mark.parametrize("fields, words", [
    ({"blocks": 100_000_000}, "num_hidden_layers must be a whole number from 1 to 4096, got 100000000"),
    ({"heads": 3}, "not a multiple of the number of attention heads"),
    ({"vocab": None}, "cannot tell the vocabulary size"),
])
def test_gguf_bad_metadata_is_one_line_and_fast(tmp_path, capsys, fields, words):
    path = header_only_gguf(tmp_path / "bad.gguf", **fields)
    t0 = time.perf_counter()
    err = one_line_error(["info", str(path)], capsys)
    assert time.perf_counter() - t0 < 60  # bounded (hours or no end without the limit), with room for a slow machine
    assert words in err


def test_every_tiny_family_still_loads(hf_dirs):
    """The exact-shape checks accept every real layout (biases, q/k norms, tied heads)."""
    import cca_jax
    from cca_jax.weights import assemble, mapping

    for fam, (_, d) in hf_dirs.items():
        model, _ = cca_jax.load_model(d, with_tokenizer=False)
        for e in mapping.entries(model.config):
            assert assemble.hf_shape(e) == mapping.to_hf(np.zeros(e.shape, np.float32), e).shape, (fam, e)

