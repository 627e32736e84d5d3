"""The README's Python API runs as written (issue 23): its snippets execute on the tiny
model (a Hugging Face directory of the tiny random llama with the character tokenizer
stands in for the hub model), and its hints name commands that exist."""

import re
from pathlib import Path

import jax
import numpy as np

import cca_jax
from cca_jax.char_tokenizer import char_tokenizer

ROOT = Path(__file__).parent.parent
README = ROOT / "README.md"
HUB_MODEL = '"google/gemma-2-2b-it"'


def _section(title: str) -> str:
    text = README.read_text(encoding="utf-8")
    start = text.index(f"\n## {title}\n")
    end = text.find("\n## ", start + 1)
    return text[start:end if end > 0 else len(text)]


def test_python_api_snippets_run_on_the_tiny_model(tmp_path, monkeypatch):
    blocks = re.findall(r"```python\n(.*?)```", _section("Python API"), re.S)
    assert len(blocks) == 2 and HUB_MODEL in blocks[0]
    model, _ = cca_jax.load_model(ROOT / "configs" / "models" / "tiny-llama.yaml")
    hf_dir = cca_jax.export_hf(model, tmp_path / "tiny-hf", tokenizer=char_tokenizer(model.config.vocab_size))
    monkeypatch.chdir(tmp_path)  # the snippets write runs/ and out/ relative to the current folder
    ns: dict = {}
    exec(compile(blocks[0].replace(HUB_MODEL, repr(str(hf_dir))), "README.md: Python API 1", "exec"), ns)
    assert ns["out"].activations["q"].shape[:3] == (model.config.num_layers, 1, 1)
    assert not np.array_equal(np.asarray(ns["patched"].logits), np.asarray(cca_jax.forward(
        ns["cfg"], ns["params"], ns["ids"]).logits))  # the knocked-out neuron changed the logits
    assert ns["new"] and all(isinstance(t, int) for t in ns["new"][0])
    assert (tmp_path / "out" / "gemma-2-2b-it-copy" / "config.json").exists()

    exec(compile(blocks[1], "README.md: Python API 2", "exec"), ns)
    assert (tmp_path / "runs" / "tiny-api" / "summary.json").exists()
    assert set(ns["res"].mask) == {"q", "k", "v", "mlp"}
    assert (tmp_path / "out" / "tiny-amplified" / "generation_config.json").exists()
    assert ns["amplified"].config == ns["model"].config

    # "Train the circuit in your own loop", on the run above: only circuit rows moved
    (block,) = re.findall(r"```python\n(.*?)```", _section("Train the circuit in your own loop"), re.S)
    exec(compile(block, "README.md: circuit loop", "exec"), ns)
    from cca_jax.cca import components

    rows = components.update_masks(ns["mask"], ns["params0"])
    moved = 0
    for before, after, r in zip(jax.tree.leaves(ns["params0"]), jax.tree.leaves(ns["params"]),
                                jax.tree.leaves(rows, is_leaf=lambda x: x is None)):
        keep = np.ones(before.shape, bool) if r is None else ~np.broadcast_to(np.asarray(r) != 0, before.shape)
        assert np.array_equal(np.asarray(before)[keep], np.asarray(after)[keep])
        moved += int(np.any(np.asarray(before) != np.asarray(after)))
    assert moved > 0 and np.isfinite(float(ns["loss"]))


def test_hints_name_commands_that_exist():
    text = README.read_text(encoding="utf-8")
    assert "huggingface-cli" not in text and "hf auth login" in text
    assert not re.search(r"cca_jax\.generate\(", text)  # a module, not a function
    from cca_jax.weights import hf

    src = Path(hf.__file__).read_text()
    assert "huggingface-cli" not in src and "hf auth login" in src
