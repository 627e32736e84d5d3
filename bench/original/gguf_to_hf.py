"""GGUF -> Hugging Face safetensors directory, dequantized by transformers' own GGUF loader.

    python gguf_to_hf.py MODEL.gguf OUT_DIR [--dtype float32|float16|bfloat16]

Run it with the transformers the original release pins (4.53.0, in its own environment): the
directory is then written in the format that version reads back (config.json keys such as
rope_theta), and the weights are whatever ``from_pretrained(dir, gguf_file=...)`` makes of
the GGUF (the ``gguf`` package dequantizes, transformers maps names and undoes llama.cpp's
q/k row permutation). float32 by default: the original casts to float16 when it loads, and
cca_jax casts to its run dtype, so neither sees a second rounding.

Writes into OUT_DIR.tmp and renames it into place, so an interrupted run leaves no half
directory; refuses to overwrite an existing OUT_DIR.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import time
from pathlib import Path


def _fail(msg: str) -> None:
    print(f"gguf_to_hf: error: {msg}", file=sys.stderr)
    sys.exit(2)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("gguf", type=Path)
    ap.add_argument("out", type=Path)
    ap.add_argument("--dtype", default="float32", choices=("float32", "float16", "bfloat16"))
    a = ap.parse_args(argv)
    if not a.gguf.is_file():
        _fail(f"no such GGUF file: {a.gguf}")
    if a.out.exists():
        _fail(f"{a.out} exists: remove it or choose another output directory")

    import torch
    import transformers
    from transformers import AutoModelForCausalLM, AutoTokenizer

    t0 = time.perf_counter()
    d, f = str(a.gguf.parent.resolve()), a.gguf.name
    tok = AutoTokenizer.from_pretrained(d, gguf_file=f)
    model = AutoModelForCausalLM.from_pretrained(d, gguf_file=f, torch_dtype=getattr(torch, a.dtype))
    tmp = a.out.with_name(a.out.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    model.save_pretrained(tmp, safe_serialization=True)
    tok.save_pretrained(tmp)
    info = {"source": str(a.gguf), "source_bytes": a.gguf.stat().st_size, "dtype": a.dtype,
            "transformers": transformers.__version__, "torch": torch.__version__,
            "parameters": sum(p.numel() for p in model.parameters()),
            "seconds": round(time.perf_counter() - t0, 2)}
    (tmp / "converted_from_gguf.json").write_text(json.dumps(info, indent=2) + "\n")
    os.replace(tmp, a.out)
    print(json.dumps(info))
    return 0


if __name__ == "__main__":
    sys.exit(main())
