import os
import sys

import pytest

# no persistent compilation cache in the test process (the pipeline's default on the CPU;
# a test that needs one sets it in a subprocess)
os.environ.setdefault("CCA_JAX_COMPILE_CACHE", "off")
# nor a GGUF load cache in ~/.cache (tests/test_gguf_fast_load.py points one at tmp_path)
os.environ.setdefault("CCA_JAX_GGUF_CACHE", "off")

sys.path.insert(0, os.path.dirname(__file__))  # tests/tiny.py

import jax  # noqa: E402

jax.config.update("jax_default_matmul_precision", "highest")


@pytest.fixture(scope="session")
def hf_dirs(tmp_path_factory):
    """family -> (transformers model, its saved directory), built once per session."""
    import tiny

    out = {}
    for fam in tiny.FAMILIES:
        m = tiny.hf_model(fam)
        d = tmp_path_factory.mktemp(f"hf_{fam}")
        m.save_pretrained(d)
        out[fam] = (m, d)
    return out


def _memory_maps() -> int:
    try:
        with open("/proc/self/maps", "rb") as f:
            return sum(1 for _ in f)
    except OSError:  # not Linux: no such limit to watch
        return 0


@pytest.fixture(autouse=True, scope="module")
def _free_compiled_programs():
    """Compiled programs are dropped after a test module once the process holds many
    memory maps: each XLA:CPU executable keeps several, and past the kernel's
    vm.max_map_count (65,530) LLVM's next allocation fails (a segfault or "Cannot
    allocate memory" inside XLA compilation, as a whole-suite run in one process hit)."""
    yield
    if _memory_maps() > 20_000:
        import gc

        jax.clear_caches()
        gc.collect()
