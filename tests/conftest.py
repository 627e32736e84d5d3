import os
import sys
import tempfile

import pytest

# the pipeline's persistent compilation cache: a fresh one per test session, never the
# user's (~/.cache/cca_jax/xla)
os.environ.setdefault("CCA_JAX_COMPILE_CACHE", tempfile.mkdtemp(prefix="cca_jax_xla_"))

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
