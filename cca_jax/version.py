"""The package version (its own module: the GGUF load cache keys on it without importing
the package)."""

VERSION = "0.1.0"
