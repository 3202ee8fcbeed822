"""`from_pretrained` / `save_pretrained`: patched checkpoints as whole folders.

`save_pretrained` writes a model (patched or stock) and its tokenizer atomically: into a
temporary sibling folder through the model's own `save_pretrained` (for a patched model the
stock weights, the added tensors and the moe_sft config, see `moe_sft.checkpoint`), then one
rename. `from_pretrained` loads the base weights with stock transformers, patches the model
with the saved config (creating the added tensors with their initial values) and fills every
added tensor from the checkpoint, refusing one that lacks any.
"""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path

from transformers import AutoModelForCausalLM, PreTrainedModel

from .checkpoint import CheckpointError, load_extra_tensors
from .config import CONFIG_NAME, ConfigError, config_class
from .io import atomic_directory
from .patching import patch_model

logger = logging.getLogger(__name__)


def save_pretrained(model: PreTrainedModel, out_dir: str | os.PathLike, *, tokenizer=None, overwrite: bool = False, **kwargs) -> Path:
    """Save `model` to `out_dir` atomically; keyword arguments go to `model.save_pretrained`
    (e.g. `state_dict=` gathered ZeRO-3 weights, `max_shard_size`)."""
    out_dir = Path(out_dir)
    with atomic_directory(out_dir, overwrite=overwrite) as tmp:
        model.save_pretrained(tmp, **kwargs)
        if tokenizer is not None:
            tokenizer.save_pretrained(tmp)
    return out_dir


def _local_dir(path: str, **hub_kwargs) -> Path | None:
    """`path` as a local folder, downloading a hub repo only if it is a patched checkpoint."""
    if os.path.isdir(path):
        return Path(path)
    from transformers.utils import cached_file

    found = cached_file(path, CONFIG_NAME, _raise_exceptions_for_missing_entries=False, **hub_kwargs)
    if found is None:
        return None
    from huggingface_hub import snapshot_download

    return Path(snapshot_download(path, allow_patterns=["*.json", "*.safetensors"], **hub_kwargs))


def _check_weights(local: Path) -> None:
    """A moe_sft folder without the stock weights would load as a fresh random model."""
    if not any(local.glob("model*.safetensors")) and not any(local.glob("pytorch_model*.bin")):
        if (local / "adapter_config.json").is_file():
            raise CheckpointError(
                f"{local} is a LoRA adapter (adapter_config.json), not a model: load it onto its base model with "
                "moe_sft.methods.lora.load_adapter(base_model, dir)"
            )
        raise CheckpointError(
            f"{local} holds a {CONFIG_NAME} but no model*.safetensors: the base weights are missing (a copy cut "
            "short?); save the model again, or point at the folder that holds them"
        )


def from_pretrained(path: str | os.PathLike, config=None, **kwargs) -> PreTrainedModel:
    """Load a model saved by `moe-sft patch` / `save_pretrained`, patched exactly as saved.

    path    a local folder or a hub id
    config  patch a checkpoint that has no moe_sft_config.json with this MoESFTConfig (a folder
            that has one is always restored with its own; passing both is an error)
    kwargs  go to `AutoModelForCausalLM.from_pretrained` (dtype, device_map, ...)

    A stock checkpoint with `config=None` is returned unpatched.
    """
    path = str(path)
    hub_kwargs = {k: kwargs[k] for k in ("revision", "token", "cache_dir") if k in kwargs}
    local = _local_dir(path, **hub_kwargs)
    saved = local is not None and (local / CONFIG_NAME).is_file()
    if saved and config is not None:
        raise ConfigError(f"{path} already holds a {CONFIG_NAME}; load it without `config=` (it is restored as saved)")
    if saved:
        saved_config = config_class().load(local)  # a damaged config fails before the weights load
        _check_weights(local)
    model = AutoModelForCausalLM.from_pretrained(path, **kwargs)
    if saved:
        handle = patch_model(model, saved_config)
        n = load_extra_tensors(handle, local)
        logger.info("moe_sft: restored patched model from %s (%d moe_sft tensors loaded by moe_sft)", path, n)
    elif config is not None:
        patch_model(model, config)
    return model


def read_saved_config(path: str | os.PathLike) -> dict | None:
    """The saved moe_sft config of a local checkpoint folder, or None for a stock one."""
    file = Path(path) / CONFIG_NAME
    return json.loads(file.read_text()) if file.is_file() else None
