"""moe_sft: MoE-aware supervised fine-tuning for Hugging Face Mixture-of-Experts models.

    import moe_sft
    handle = moe_sft.patch_model(model, moe_sft.MoESFTConfig())  # explicit, per instance
    ...
    handle.revert()                                              # back to the stock model

Importing this package patches nothing.
"""

from .adapters import PatchError, RouterSpec, supported_model_types
from .checkpoint import CheckpointError, from_pretrained, save_pretrained
from .condenser import CondenserCallback, CondenserConfig, start_phase2, update_router_bias
from .config import ConfigError, MoESFTConfig, RoutingConfig
from .moe_bias_head import (
    MoEBiasHeadConfig,
    apply_moe_bias,
    get_moe_bias_layer,
    load_moe_bias_adapter,
    moe_bias_disabled,
    save_moe_bias_adapter,
)
from .patching import PatchHandle, get_handle, patch_model

__version__ = "0.1.0"

__all__ = [
    "CheckpointError",
    "CondenserCallback",
    "CondenserConfig",
    "ConfigError",
    "MoEBiasHeadConfig",
    "MoESFTConfig",
    "PatchError",
    "PatchHandle",
    "RouterSpec",
    "RoutingConfig",
    "apply_moe_bias",
    "from_pretrained",
    "get_handle",
    "get_moe_bias_layer",
    "load_moe_bias_adapter",
    "moe_bias_disabled",
    "patch_model",
    "save_moe_bias_adapter",
    "save_pretrained",
    "start_phase2",
    "supported_model_types",
    "update_router_bias",
]
