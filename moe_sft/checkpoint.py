"""Patched checkpoints: base weights + the tensors the patch added + `moe_sft_config.json`.

Layout of a patched checkpoint folder:
    config.json, model*.safetensors   the base model, exactly as stock transformers saves it
    moe_sft_tensors.safetensors       the tensors the patch added, keyed by their runtime names
    moe_sft_config.json               the MoESFTConfig the model was patched with

The added tensors get their own file because transformers 5 may rename keys on save for some
families (Mixtral is saved in its original per-expert layout), and because a stock
transformers load of the folder should see a clean stock checkpoint.

`save_pretrained` writes one atomically; `from_pretrained` loads the base weights with stock
transformers, patches the model with the saved config (creating the extra tensors with their
initial values) and fills every extra tensor from the checkpoint, refusing one that lacks any.
"""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from transformers import AutoModelForCausalLM, PreTrainedModel

from .config import CONFIG_NAME, MoESFTConfig
from .io import atomic_directory
from .patching import PatchHandle, get_handle, patch_model

logger = logging.getLogger(__name__)

TENSORS_NAME = "moe_sft_tensors.safetensors"


class CheckpointError(RuntimeError):
    """A checkpoint is missing files or tensors; the message names them."""


def save_pretrained(
    model: PreTrainedModel,
    out_dir: str | os.PathLike,
    *,
    tokenizer=None,
    overwrite: bool = False,
    state_dict: dict[str, torch.Tensor] | None = None,
    **kwargs,
) -> Path:
    """Save a patched (or stock) model to `out_dir` atomically. `state_dict` replaces the live
    weights (e.g. ZeRO-3 parameters gathered to rank 0); extra keyword arguments go to
    `model.save_pretrained` (e.g. `max_shard_size`)."""
    handle = get_handle(model)
    out_dir = Path(out_dir)
    extra = set(handle.extra_state_dict()) if handle is not None else set()
    if state_dict is not None and extra - set(state_dict):
        raise CheckpointError(f"the state dict to save lacks moe_sft tensors {sorted(extra - set(state_dict))[:3]}")
    with atomic_directory(out_dir, overwrite=overwrite) as tmp:
        if extra or state_dict is not None:
            state = state_dict if state_dict is not None else model.state_dict()
            model.save_pretrained(tmp, state_dict={k: v for k, v in state.items() if k not in extra}, **kwargs)
        else:
            model.save_pretrained(tmp, **kwargs)
        if tokenizer is not None:
            tokenizer.save_pretrained(tmp)
        if handle is not None:
            save_extra_tensors(handle, tmp, state_dict)
            handle.config.save(tmp)
    logger.info("moe_sft: saved %s to %s (%d moe_sft tensors)", type(model).__name__, out_dir, len(extra))
    return out_dir


def save_extra_tensors(handle: PatchHandle, directory: str | os.PathLike, state_dict: dict | None = None) -> Path | None:
    """Write the patch's extra tensors to `directory/moe_sft_tensors.safetensors`, taking their
    values from `state_dict` when given (gathered weights) or else from the live model."""
    extra = handle.extra_state_dict()
    if not extra:
        return None
    source = state_dict if state_dict is not None else extra
    path = Path(directory) / TENSORS_NAME
    save_file({k: source[k].detach().cpu().contiguous() for k in extra}, str(path), metadata={"format": "pt"})
    return path


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


def load_extra_tensors(handle: PatchHandle, directory: str | os.PathLike) -> int:
    """Fill the patch's extra tensors from `directory/moe_sft_tensors.safetensors`."""
    directory = Path(directory)
    expected = handle.extra_state_dict()
    if not expected:
        return 0
    path = directory / TENSORS_NAME
    if not path.is_file():
        raise CheckpointError(
            f"{directory} has a {CONFIG_NAME} whose methods add {len(expected)} tensor(s), but no {TENSORS_NAME}; "
            "save patched models with moe_sft.save_pretrained (or `moe-sft patch`)"
        )
    found = load_file(str(path))
    missing = sorted(set(expected) - set(found))
    if missing:
        raise CheckpointError(
            f"{path} lacks {len(missing)} tensor(s) that its {CONFIG_NAME} needs, e.g. {missing[:3]}; "
            "the checkpoint was not saved from a model patched with this config"
        )
    with torch.no_grad():
        for key, target in expected.items():
            src = found[key]
            if src.shape != target.shape:
                raise CheckpointError(f"{path}: tensor {key} has shape {tuple(src.shape)}, expected {tuple(target.shape)}")
            target.copy_(src.to(target.dtype))
    return len(expected)


def from_pretrained(
    path: str | os.PathLike, config: MoESFTConfig | None = None, **kwargs
) -> PreTrainedModel:
    """Load a model saved by `moe-sft patch` / `save_pretrained`, patched exactly as saved.

    path    a local folder or a hub id
    config  patch a checkpoint that has no moe_sft_config.json with this config (a folder
            that has one is always restored with its own; passing both is an error)
    kwargs  go to `AutoModelForCausalLM.from_pretrained` (dtype, device_map, ...)

    A stock checkpoint with `config=None` is returned unpatched.
    """
    path = str(path)
    hub_kwargs = {k: kwargs[k] for k in ("revision", "token", "cache_dir") if k in kwargs}
    local = _local_dir(path, **hub_kwargs)
    saved = local is not None and (local / CONFIG_NAME).is_file()
    if saved and config is not None:
        raise ValueError(f"{path} already holds a {CONFIG_NAME}; load it without `config=` (it is restored as saved)")
    model = AutoModelForCausalLM.from_pretrained(path, **kwargs)
    if saved:
        handle = patch_model(model, MoESFTConfig.load(local))
        n = load_extra_tensors(handle, local)
        logger.info("moe_sft: restored patched model from %s (%d moe_sft tensors loaded by moe_sft)", path, n)
    elif config is not None:
        patch_model(model, config)
    return model


def read_saved_config(path: str | os.PathLike) -> dict | None:
    """The saved moe_sft config of a local checkpoint folder, or None for a stock one."""
    file = Path(path) / CONFIG_NAME
    return json.loads(file.read_text()) if file.is_file() else None
