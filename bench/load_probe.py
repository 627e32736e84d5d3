"""Where a GGUF load's seconds go: first load, cached loads, the host path, the file read.

    python bench/load_probe.py MODEL.gguf [--dtype bfloat16]

Each measurement runs in a fresh Python process (imports are part of a load), with a
new, empty GGUF load cache (``CCA_JAX_GGUF_CACHE``) for the probe:

- ``read``: the file's bytes read into memory (the floor a load cannot beat);
- ``first``: ``load_model`` with nothing cached: the header parsed, transformers' config
  and tokenizer converter, tensors expanded on the device, the cache written;
- ``cached`` (twice): the same call, served by the cache;
- ``host``: the path before the device dequantizers (gguf's reader, numpy dequantizing,
  host assembly, transformers' converter), for comparison.

Each prints one JSON line: seconds for imports (``import cca_jax`` and the backend up),
the load, and whether torch was imported.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

_CHILD = r"""
import json, sys, time
t0 = time.perf_counter()
import jax
import cca_jax
jax.block_until_ready(jax.numpy.zeros(1))
t1 = time.perf_counter()
path, dtype, mode = sys.argv[1], sys.argv[2], sys.argv[3]
if mode == "read":
    import numpy as np
    n = int(np.fromfile(path, dtype=np.uint8).size)
    out = {"bytes": n}
elif mode == "host":
    from pathlib import Path
    from cca_jax import config as config_lib
    from cca_jax.weights import assemble, gguf
    p = Path(path)
    reader = gguf.reader(p)
    hf, arch = gguf.hf_config(reader, p)
    cfg = config_lib.from_hf(hf)
    params = assemble.assemble(cfg, gguf.iter_tensors(reader, cfg, arch, p), config_lib.parse_dtype(dtype), path)
    jax.block_until_ready(params)
    gguf.load_tokenizer(p, reader)
    out = {}
else:
    model, tok = cca_jax.load_model(path, dtype)
    jax.block_until_ready(model.params())
    out = {"tokenizer": type(tok).__name__}
t2 = time.perf_counter()
print(json.dumps({"mode": mode, "imports": round(t1 - t0, 2), "load": round(t2 - t1, 2),
                  "torch_imported": "torch" in sys.modules, **out}), flush=True)
"""


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("gguf")
    ap.add_argument("--dtype", default="bfloat16")
    args = ap.parse_args()
    repo = str(Path(__file__).resolve().parent.parent)
    with tempfile.TemporaryDirectory(prefix="cca_jax_load_probe_") as cache:
        env = {**os.environ, "CCA_JAX_GGUF_CACHE": cache,
               "PYTHONPATH": repo + os.pathsep + os.environ.get("PYTHONPATH", "")}
        for mode in ("read", "first", "cached", "cached", "host"):
            t = time.perf_counter()
            r = subprocess.run([sys.executable, "-c", _CHILD, args.gguf, args.dtype, mode], env=env,
                               capture_output=True, text=True)
            line = r.stdout.strip().splitlines()[-1] if r.returncode == 0 and r.stdout.strip() else None
            rec = json.loads(line) if line else {"mode": mode, "error": r.stderr.strip()[-400:]}
            rec["process"] = round(time.perf_counter() - t, 2)
            print(json.dumps(rec), flush=True)


if __name__ == "__main__":
    main()
