"""Glue to the trainers users bring: transformers' Trainer (and everything built on it, TRL
included), TRL's fused LM head, DeepSpeed. Each module is narrow and imports its library lazily."""
