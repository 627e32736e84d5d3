import os
import sys

import pytest

# no persistent compilation cache in the test process (the pipeline's default on the CPU;
# a test that needs one sets it in a subprocess)
os.environ.setdefault("CCA_JAX_COMPILE_CACHE", "off")

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


@pytest.fixture(autouse=True, scope="module")
def _free_compiled_programs():
    """Each test module's compiled programs and arrays are dropped after it: a whole
    session in one process otherwise keeps thousands of XLA executables alive."""
    yield
    import gc

    jax.clear_caches()
    gc.collect()
