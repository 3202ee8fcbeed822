"""moe_sft: MoE-aware supervised fine-tuning for Hugging Face Mixture-of-Experts models.

    import moe_sft
    handle = moe_sft.patch_model(model, moe_sft.MoESFTConfig())  # explicit, per instance
    ...
    handle.revert()                                              # back to the stock model

Importing this package patches nothing.
"""

import importlib

# Public names and the submodule that defines each; imported on first use, so that
# `import moe_sft` (and `moe-sft --help`) does not pay for torch and transformers.
_EXPORTS = {
    "PatchError": "adapters",
    "RouterSpec": "adapters",
    "supported_model_types": "adapters",
    "CheckpointError": "checkpoint",
    "from_pretrained": "checkpoint",
    "save_pretrained": "checkpoint",
    "CondenserCallback": "condenser",
    "CondenserConfig": "condenser",
    "start_phase2": "condenser",
    "update_router_bias": "condenser",
    "ConfigError": "config",
    "MoESFTConfig": "config",
    "RoutingConfig": "config",
    "MoEBiasHeadConfig": "moe_bias_head",
    "apply_moe_bias": "moe_bias_head",
    "get_moe_bias_layer": "moe_bias_head",
    "load_moe_bias_adapter": "moe_bias_head",
    "moe_bias_disabled": "moe_bias_head",
    "save_moe_bias_adapter": "moe_bias_head",
    "PatchHandle": "patching",
    "get_handle": "patching",
    "patch_model": "patching",
}


def __getattr__(name: str):
    if name not in _EXPORTS:
        raise AttributeError(f"module 'moe_sft' has no attribute {name!r}")
    value = getattr(importlib.import_module(f".{_EXPORTS[name]}", __name__), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_EXPORTS))


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
