"""Baselines on the same train split as CCA (SPEC 5): supervised fine-tuning, full and LoRA."""
