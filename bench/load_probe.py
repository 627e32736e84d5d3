"""Where a GGUF load's seconds go, and which way of assembling is faster on this host.

    python bench/load_probe.py MODEL.gguf [--dtype bfloat16]

Times, each in this process: parsing the header (gguf's reader) and the config; building
the tokenizer alone; dequantizing every tensor alone (``iter_tensors``); then whole
``load_model`` calls with the tensors assembled on the calling thread (``assemble``) or
on worker threads (tried in the tenth session: no faster on a 32-core H200 host), and one
with the tokenizer built on a thread beside the weights (also tried: slower, the GIL).
Prints one JSON line per measurement.
"""

from __future__ import annotations

import argparse
import concurrent.futures
import json
import os
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))


def _threaded_assemble(cfg, tensors, dtype, source, put=None):
    """Each tensor transposed and cast into its slot on worker threads (the variant tried)."""
    import collections
    from concurrent.futures import ThreadPoolExecutor

    import jax
    import numpy as np

    from cca_jax.weights import assemble as a

    put = put or (lambda path, x: jax.device_put(x))
    ndt = a._np_dtype(dtype)
    table, buffers, filled, need, seen, out = a._table(cfg), {}, {}, {}, set(), {}
    for e in table.values():
        need[e.path] = need.get(e.path, 0) + 1
    workers, inflight = min(8, os.cpu_count() or 1), collections.deque()

    def settle():
        e, job = inflight.popleft()
        job.result()
        filled[e.path] = filled.get(e.path, 0) + 1
        if filled[e.path] == need[e.path]:
            node = out
            for p in e.path[:-1]:
                node = node.setdefault(p, {})
            node[e.path[-1]] = put(e.path, buffers.pop(e.path))

    with ThreadPoolExecutor(workers) as pool:
        for raw_name, x in tensors:
            e = a._entry(table, cfg, raw_name, source)
            if e is None:
                continue
            a._check_new(e, raw_name, x.shape, seen, source)
            if e.path not in buffers:
                buffers[e.path] = np.empty(((cfg.num_layers,) if e.layer is not None else ()) + e.shape, ndt)
            dst = buffers[e.path] if e.layer is None else buffers[e.path][e.layer]
            view = np.asarray(x)
            view = (view.T if e.transform in ("proj", "out_proj", "transpose") else view).reshape(e.shape)
            inflight.append((e, pool.submit(np.copyto, dst, view, "unsafe")))
            while len(inflight) > 2 * workers:
                settle()
        while inflight:
            settle()
    return out


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("gguf")
    ap.add_argument("--dtype", default="bfloat16")
    args = ap.parse_args()
    import jax

    import cca_jax
    from cca_jax import config as config_lib
    from cca_jax.weights import assemble, gguf

    path = Path(args.gguf)
    out = {"cpus": os.cpu_count(), "backend": jax.default_backend()}

    def timed(name, fn):
        t = time.perf_counter()
        r = fn()
        out[name] = round(time.perf_counter() - t, 2)
        print(json.dumps({name: out[name]}), flush=True)
        return r

    jax.block_until_ready(jax.numpy.zeros(1))  # the backend up before anything is timed
    reader = timed("reader", lambda: gguf.reader(path))
    hf, arch = timed("hf_config", lambda: gguf.hf_config(reader, path))
    cfg = config_lib.from_hf(hf)
    timed("tokenizer_alone", lambda: gguf.load_tokenizer(path, reader))
    timed("dequantize_alone", lambda: sum(1 for _ in gguf.iter_tensors(reader, cfg, arch, path)))
    serial = assemble.assemble
    for asm_name, asm in (("threads", _threaded_assemble), ("serial", serial), ("threads_again", _threaded_assemble)):
        assemble.assemble = asm
        try:
            timed(f"load_{asm_name}", lambda: jax.block_until_ready(cca_jax.load_model(path, args.dtype)[0].params()))
        finally:
            assemble.assemble = serial
    # the tokenizer built on a thread beside the weights (tried this session: GIL contention)
    with concurrent.futures.ThreadPoolExecutor(1) as pool:
        def beside():
            job = pool.submit(gguf.load_tokenizer, path, reader)
            params = cca_jax.load_model(path, args.dtype, with_tokenizer=False)[0].params()
            jax.block_until_ready(params)
            return job.result()
        timed("load_threads_tokenizer_beside", beside)
    print(json.dumps(out))


if __name__ == "__main__":
    main()
