"""The ``cca-jax`` command: thin wrappers that parse, call the API and print.

Errors caused by input (``CCAError``) print one line and exit with status 2.
"""

from __future__ import annotations

import argparse
import json
import sys


def _source(model: str) -> str:
    from cca_jax import models

    return str(models.resolve(model)) if model in models.OFFLINE_MODELS else model


def _summary(model) -> dict:
    import jax

    cfg = model.config
    n_params = sum(int(x.size) for x in jax.tree.leaves(model.params()))
    return {
        "family": cfg.family,
        "layers": cfg.num_layers,
        "hidden_size": cfg.hidden_size,
        "heads": cfg.num_heads,
        "kv_heads": cfg.num_kv_heads,
        "head_dim": cfg.head_dim,
        "mlp_neurons": cfg.intermediate_size,
        "vocab_size": cfg.vocab_size,
        "parameters": n_params,
        "components": cfg.num_components,
        "components_per_layer": cfg.components_per_layer,
        "dtype": str(model.dtype),
    }


def cmd_info(args) -> int:
    from cca_jax import load_model

    model, tok = load_model(_source(args.model), dtype=args.dtype, with_tokenizer=args.prompt is not None)
    info = _summary(model)
    if args.prompt is not None:
        import jax.numpy as jnp

        if tok is None:
            from cca_jax.errors import CCAError

            raise CCAError(f"{args.model}: no tokenizer found, cannot encode --prompt")
        ids = tok(args.prompt)["input_ids"]
        logits = model(jnp.asarray([ids]), at=jnp.asarray([[len(ids) - 1]])).logits[0, 0]
        top = jnp.argsort(-logits)[:5]
        info["next_token_top5"] = [[tok.decode([int(i)]), round(float(logits[i]), 3)] for i in top]
    print(json.dumps(info, indent=2))
    return 0


def cmd_export(args) -> int:
    from cca_jax import export_hf, load_model

    model, tok = load_model(_source(args.model), dtype=args.dtype)
    out = export_hf(model, args.out, dtype=args.out_dtype or args.dtype, tokenizer=tok)
    print(f"wrote {out}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="cca-jax", description="Constructive Circuit Amplification in JAX")
    sub = p.add_subparsers(dest="command", required=True)
    src_help = "a Hugging Face directory, hub id, .gguf file, or an offline model name (smollm2-135m)"

    s = sub.add_parser("info", help="load a model and print its size and circuit components")
    s.add_argument("model", help=src_help)
    s.add_argument("--dtype", default="float32")
    s.add_argument("--prompt", help="also print the top-5 next tokens after this text")
    s.set_defaults(func=cmd_info)

    s = sub.add_parser("export", help="convert a model (e.g. GGUF) to a Hugging Face directory")
    s.add_argument("model", help=src_help)
    s.add_argument("out", help="output directory (written atomically)")
    s.add_argument("--dtype", default="float32", help="dtype to load in")
    s.add_argument("--out-dtype", default=None, help="dtype of the written tensors (default: --dtype)")
    s.set_defaults(func=cmd_export)
    return p


def main(argv: list[str] | None = None) -> int:
    from cca_jax.errors import CCAError

    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except CCAError as err:
        print(f"cca-jax: error: {err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("cca-jax: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
