"""moe_sft: MoE-aware supervised fine-tuning for Hugging Face Mixture-of-Experts models.

    import moe_sft
    handle = moe_sft.patch_model(model, moe_sft.MoESFTConfig())  # explicit, per instance
    ...
    handle.revert()                                              # back to the stock model

Importing this package patches nothing.
"""

import importlib

# Public names of the core and the integrations, and the submodule that defines each; imported
# on first use, so that `import moe_sft` (and `moe-sft --help`) does not pay for torch and
# transformers. Every method plug-in adds its own names (`Method.exports`, `moe_sft.plugins`).
_EXPORTS = {
    "PatchError": "adapters",
    "RouterSpec": "adapters",
    "supported_model_types": "adapters",
    "CheckpointError": "checkpoint",
    "ConfigError": "config",
    "MoESFTConfig": "config",
    "RoutingConfig": "config",
    "MoESFTCallback": "integrations.hf_trainer",
    "PatchHandle": "patching",
    "find_handle": "patching",
    "get_handle": "patching",
    "patch_model": "patching",
    "step": "patching",
    "Method": "plugins",
    "register_method": "plugins",
    "MoEGRPOTrainer": "rl",
    "from_pretrained": "pretrained",
    "save_pretrained": "pretrained",
}


def __getattr__(name: str):
    if name in _EXPORTS:
        value = getattr(importlib.import_module(f".{_EXPORTS[name]}", __name__), name)
    elif not name.startswith("_"):
        from .plugins import find_export

        try:
            value = find_export(name)
        except AttributeError:
            raise AttributeError(f"module 'moe_sft' has no attribute {name!r}") from None
    else:
        raise AttributeError(f"module 'moe_sft' has no attribute {name!r}")
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    from .plugins import all_exports

    return sorted(set(globals()) | set(_EXPORTS) | set(all_exports()))


__version__ = "0.1.0"
