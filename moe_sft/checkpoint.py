"""The patched-checkpoint layout: what a patched model writes beside its stock weights.

A patched checkpoint folder holds
    config.json, model*.safetensors   the base model, exactly as stock transformers saves it
                                      (stock keys only; config.json as the model was loaded)
    moe_sft_tensors.safetensors       the tensors the patch added, keyed by their runtime names
    moe_sft_config.json               the resolved MoESFTConfig the model was patched with

The added tensors get their own file because transformers 5 renames keys on save for MoE
families (the hub's per-expert layout), and so that a stock `from_pretrained` of the folder
sees a clean stock checkpoint. `save_patched` is what a patched model's `save_pretrained`
runs (so `Trainer.save_model`, Trainer checkpoints and `push_to_hub` write complete patched
checkpoints); `load_extra_tensors` fills a patched model's added tensors from a folder.
This module works on a `PatchHandle` it is given and imports no other part of moe_sft but
the config.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from .config import CONFIG_NAME

logger = logging.getLogger(__name__)

TENSORS_NAME = "moe_sft_tensors.safetensors"


class CheckpointError(RuntimeError):
    """A checkpoint is missing files or tensors, or is damaged; the message names the file."""


def save_patched(handle, save_directory, *, state_dict=None, is_main_process: bool = True, **kwargs) -> None:
    """`model.save_pretrained` of a patched model: the stock save of the stock keys (hub layout,
    config.json as loaded), then the added tensors and the moe_sft config beside them.

    state_dict  replaces the live weights (e.g. ZeRO-3 parameters gathered to rank 0); it
                must hold the added tensors too
    While `handle.saving_checkpoint` is set (a Trainer checkpoint, set by MoESFTCallback), the
    weights keep the runtime (fused) layout: the Trainer resumes them with a plain
    `load_state_dict`, which the hub's per-expert layout would silently miss.
    """
    model = handle.model
    if state_dict is not None and not state_dict:
        # The Trainer under ZeRO-3 without stage3_gather_16bit_weights_on_model_save: only the
        # DeepSpeed checkpoint holds weights (the added tensors included); stock writes a stub.
        logger.warning("moe_sft: no weights to save in %s (ZeRO-3 without gathering); the DeepSpeed checkpoint has them", save_directory)
        type(model).save_pretrained(model, save_directory, state_dict=state_dict, is_main_process=is_main_process, **kwargs)
        return
    extra = handle.extra_keys()
    state = state_dict if state_dict is not None else model.state_dict()
    missing = sorted(extra - set(state))
    if missing:
        raise CheckpointError(f"the state dict to save lacks moe_sft tensors, e.g. {missing[:3]}")
    stock = {k: v for k, v in state.items() if k not in extra}
    if handle.saving_checkpoint:
        kwargs["save_original_format"] = False
    with handle.stock_config():
        type(model).save_pretrained(model, save_directory, state_dict=stock, is_main_process=is_main_process, **kwargs)
    if not is_main_process:
        return
    path = Path(save_directory) / TENSORS_NAME
    if extra:
        save_file({k: state[k].detach().cpu().contiguous() for k in sorted(extra)}, str(path), metadata={"format": "pt"})
    elif path.exists():
        path.unlink()  # a stale file from an earlier save into the same folder
    handle.config.save(save_directory)
    logger.info("moe_sft: saved %s to %s (%d moe_sft tensors)", type(model).__name__, save_directory, len(extra))


def load_extra_tensors(handle, directory: str | os.PathLike) -> int:
    """Fill the patch's added tensors from `directory/moe_sft_tensors.safetensors`; returns
    how many. Refuses a missing or damaged file and missing or misshapen tensors."""
    directory = Path(directory)
    expected = handle.extra_state_dict()
    if not expected:
        return 0
    path = directory / TENSORS_NAME
    if not path.is_file():
        raise CheckpointError(
            f"{directory} has a {CONFIG_NAME} whose methods add {len(expected)} tensor(s), but no {TENSORS_NAME}; "
            "save patched models with model.save_pretrained / moe_sft.save_pretrained (or `moe-sft patch`)"
        )
    try:
        found = load_file(str(path))
    except (SafetensorError, OSError, ValueError) as err:
        raise CheckpointError(f"{path} cannot be read ({err}); the file is damaged or cut short, save it again") from None
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
