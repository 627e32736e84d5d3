"""Weights in from Hugging Face directories, the hub and GGUF files; out to HF and orbax."""
