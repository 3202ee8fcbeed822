"""The narrow DeepSpeed / distributed glue of `moe-sft train`.

The Trainer itself fills the DeepSpeed config's "auto" values from TrainingArguments and the
model (batch sizes, accumulation, optimizer and scheduler, precision, bucket sizes). This
module reads the JSON, gives a plain process (no launcher) the environment of a one-rank
world, and on machines without a GPU applies what DeepSpeed and accelerate need to train on
CPU processes (gloo); on GPUs nothing else is changed. `deepspeed` is imported only when a
config asks for it.
"""

from __future__ import annotations

import json
import logging
import os
import socket
from pathlib import Path

import torch

from ..config import ConfigError

logger = logging.getLogger(__name__)


def load_config(path: Path) -> dict:
    if not path.is_file():
        raise ConfigError(f"deepspeed: config file {str(path)!r} not found (shipped ones: configs/deepspeed/*.json)")
    try:
        ds = json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise ConfigError(f"deepspeed: {path} line {e.lineno}: not valid JSON ({e.msg})") from None
    if not isinstance(ds, dict):
        raise ConfigError(f"deepspeed: {path} must hold a JSON object")
    return ds


def zero_stage(ds: dict | None) -> int:
    return int((ds or {}).get("zero_optimization", {}).get("stage", 0))


def _offloads_optimizer(ds: dict) -> bool:
    device = ds.get("zero_optimization", {}).get("offload_optimizer", {}).get("device", "none")
    return device not in (None, "none")


def distributed_world_size() -> int:
    return int(os.environ.get("WORLD_SIZE", "1"))


# What deepspeed / torchrun / accelerate launch set for every process (torch's env:// rendezvous).
LAUNCHER_ENV = ("RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def ensure_process_group_env(ds: dict) -> None:
    """DeepSpeed needs a process group. A plain process (no launcher: neither RANK nor
    WORLD_SIZE set) becomes a world of one on this host, as a one-process launcher would set it
    up; a launcher's incomplete environment is refused with the commands that start one."""
    if "RANK" not in os.environ and "WORLD_SIZE" not in os.environ:
        port = os.environ.get("MASTER_PORT") or str(_free_port())
        os.environ.update(RANK="0", LOCAL_RANK="0", WORLD_SIZE="1", MASTER_ADDR="127.0.0.1", MASTER_PORT=port)
        logger.info("moe_sft: deepspeed in a plain process: a world of one rank (127.0.0.1, port %s)", port)
        return
    missing = [k for k in LAUNCHER_ENV if k not in os.environ]
    if missing:
        raise ConfigError(
            f"deepspeed: a ZeRO-{zero_stage(ds)} run needs a complete launcher environment, but {', '.join(missing)} "
            "is not set. Start it with `deepspeed --num_gpus N --module moe_sft.cli train ...`, `torchrun "
            "--nproc_per_node N -m moe_sft.cli train ...` or `accelerate launch --num_processes N -m moe_sft.cli train "
            "...` (docs/training.md \"Launching\"), or as one plain process without RANK / WORLD_SIZE set"
        )


def prepare(ds: dict | None, training: dict) -> tuple[dict | None, dict]:
    """Return (DeepSpeed config to pass to TrainingArguments, extra TrainingArguments kwargs).

    Must run before TrainingArguments is built. On a CPU-only machine:
    - TrainingArguments(deepspeed=...) would leave accelerate believing the world size is 1
      on every rank (every rank then trains on the same data); a pre-configured
      `PartialState(backend="gloo")` plus `use_configured_state` gives it the real one;
    - DeepSpeed JIT-compiles a shared-memory comm op it uses only for inference (about a
      minute): marked incompatible so it is skipped;
    - with optimizer offload, DeepSpeedCPUAdam would be compiled (about two minutes): the
      Trainer's torch AdamW runs on the CPU instead.
    """
    extra: dict = {}
    gpu = torch.cuda.is_available()
    if ds is not None and not gpu:
        for key in ("bf16", "fp16"):
            if training.get(key):
                raise ConfigError(f"training.{key}: true needs a GPU; on CPU train in float32 (training.{key}=false)")
    if ds is not None:
        ensure_process_group_env(ds)
    if gpu:
        return ds, extra
    if ds is not None:
        os.environ["ACCELERATE_USE_DEEPSPEED"] = "true"
        import deepspeed.ops

        deepspeed.ops.__compatible_ops__["deepspeed_shm_comm"] = False
        if _offloads_optimizer(ds):
            ds = {**ds, "zero_force_ds_cpu_optimizer": False}
    if ds is not None or distributed_world_size() > 1:
        from accelerate import PartialState

        # Without DeepSpeed, accelerate treats CPU processes as distributed (DDP) only when told cpu=True.
        PartialState(backend="gloo", cpu=ds is None)
        extra["accelerator_config"] = {"use_configured_state": True}
    return ds, extra


def check_distributed(trainer) -> None:
    """Every rank must see the launcher's world size and a distributed accelerator, or each
    rank silently trains its own copy of the model on the same or unsynchronised data."""
    if not (torch.distributed.is_available() and torch.distributed.is_initialized()):
        return
    real = torch.distributed.get_world_size()
    seen = (trainer.args.world_size, trainer.accelerator.num_processes)
    if real > 1 and (seen != (real, real) or trainer.accelerator.distributed_type.name == "NO"):
        raise RuntimeError(
            f"torch.distributed has {real} processes but the Trainer sees world_size={seen[0]}, "
            f"accelerate num_processes={seen[1]}, distributed type {trainer.accelerator.distributed_type.name}; "
            "the ranks would not train one model. Launch with deepspeed / torchrun / accelerate launch."
        )


def check_same_on_ranks(text: str, what: str) -> None:
    """Raise if `text` differs between ranks (e.g. a selection each rank computed itself)."""
    if not (torch.distributed.is_available() and torch.distributed.is_initialized()):
        return
    texts = [None] * torch.distributed.get_world_size()
    torch.distributed.all_gather_object(texts, text)
    if any(t != texts[0] for t in texts):
        raise RuntimeError(f"{what} differs between ranks; compute it once and pass the file in the config")
