"""moe_sft: MoE-aware supervised fine-tuning for Hugging Face Mixture-of-Experts models.

    import moe_sft
    handle = moe_sft.patch_model(model, moe_sft.MoESFTConfig())  # explicit, per instance
    ...
    handle.revert()                                              # back to the stock model

Importing this package patches nothing.
"""

from .adapters import PatchError, RouterSpec, supported_model_types
from .checkpoint import CheckpointError, from_pretrained, save_pretrained
from .config import ConfigError, MoESFTConfig, RoutingConfig
from .patching import PatchHandle, get_handle, patch_model

__version__ = "0.1.0"

__all__ = [
    "CheckpointError",
    "ConfigError",
    "MoESFTConfig",
    "PatchError",
    "PatchHandle",
    "RouterSpec",
    "RoutingConfig",
    "from_pretrained",
    "get_handle",
    "patch_model",
    "save_pretrained",
    "supported_model_types",
]
