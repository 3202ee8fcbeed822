"""`moe-sft train`: YAML recipes -> data -> patched model -> HF Trainer (+ DeepSpeed ZeRO).

    from moe_sft.train import load_train_config, train
    final_dir = train(load_train_config("configs/tiny/qwen3_moe_vanilla.yaml"))
"""

from .config import DataConfig, ModelConfig, TrainConfig, load_train_config, parse_train_config
from .trainer import run_recipe, train

__all__ = ["DataConfig", "ModelConfig", "TrainConfig", "load_train_config", "parse_train_config", "run_recipe", "train"]
