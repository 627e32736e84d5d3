"""A forward on 8 host devices over an (fsdp, tp) mesh equals the single-device forward."""

import os
import subprocess
import sys
import textwrap

SCRIPT = textwrap.dedent("""
    import os, sys
    sys.path.insert(0, sys.argv[1])
    import jax, jax.numpy as jnp, numpy as np
    from flax import nnx
    jax.config.update("jax_default_matmul_precision", "highest")
    assert jax.device_count() == 8, jax.devices()
    import cca_jax, tiny
    for fam in tiny.FAMILIES:
        cfg = cca_jax.config.from_hf(tiny.hf_config(fam, hidden_size=64, num_attention_heads=4,
                                                     num_key_value_heads=2, intermediate_size=96))
        model = cca_jax.Transformer(cfg, rngs=nnx.Rngs(0))
        params = jax.tree.map(lambda x: x * 3.0, model.params())
        ids = jnp.asarray(tiny.tokens(4, 12))
        single = cca_jax.forward(cfg, jax.device_put(params, jax.devices()[0]), ids).logits
        for fsdp, tp in ((2, 4), (4, 2), (1, 8)):
            mesh = cca_jax.make_mesh(fsdp=fsdp, tp=tp)
            sharded = cca_jax.shard_params(params, mesh)
            q = sharded["layers"]["attn"]["q"]
            assert len(q.sharding.device_set) == 8
            fwd = jax.jit(lambda p, t: cca_jax.forward(cfg, p, t).logits)
            out = fwd(sharded, ids)
            diff = float(np.abs(np.asarray(out) - np.asarray(single)).max())
            # sharded matmuls sum in another order: float32 rounding relative to the logits
            scale = float(np.abs(np.asarray(single)).max())
            assert scale > 1.0 and diff <= 2e-5 * scale, (fam, fsdp, tp, diff, scale)
            print(fam, fsdp, tp, "max abs diff", diff, "of", scale)
    print("OK")
""")


def test_forward_on_8_host_devices_equals_single_device():
    env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=8", JAX_PLATFORMS="cpu")
    here = os.path.dirname(__file__)
    proc = subprocess.run([sys.executable, "-c", SCRIPT, here], capture_output=True, text=True, env=env, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.strip().endswith("OK")


def test_partition_specs_split_heads_and_neurons():
    import jax
    import numpy as np
    from jax.sharding import Mesh

    from cca_jax.weights.sharding import spec_for

    mesh = Mesh(np.array(jax.devices()[:1]).reshape(1, 1), ("fsdp", "tp"))
    assert tuple(spec_for(("layers", "attn", "q"), (2, 8, 4, 16), mesh)) == (None, "fsdp", "tp", None)
    assert tuple(spec_for(("layers", "mlp", "down"), (2, 32, 8), mesh)) == (None, "tp", "fsdp")
    assert tuple(spec_for(("layers", "attn_norm"), (2, 8), mesh)) == ()
