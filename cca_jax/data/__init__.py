"""Data: GSM-Symbolic templates (parsed safely) and the instances made from them."""

from cca_jax.data.templates import (
    Instance,
    Template,
    failed_conditions,
    instances,
    instantiate,
    instantiate_original,
    load_builtin_templates,
    load_templates,
    parse_template,
)

__all__ = [
    "Instance", "Template", "failed_conditions", "instances", "instantiate",
    "instantiate_original", "load_builtin_templates", "load_templates", "parse_template",
]
