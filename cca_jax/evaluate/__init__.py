"""Evaluation: GSM-Symbolic accuracy (and, in later issues, side-effect benchmarks)."""
