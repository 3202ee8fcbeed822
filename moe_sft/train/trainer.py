"""Build and run one `moe-sft train` job: tokenizer, data, model + patch, Trainer, final save.

Order matters:
1. everything that can be wrong with the input (config, DeepSpeed JSON, the method blocks
   against the launch, the output folder, every data record) is checked before any weight
   is loaded;
2. the model is loaded (under ZeRO-3 partitioned as it loads: TrainingArguments, and with
   it transformers' DeepSpeed config, exist first), each method prepares on it (ESFT profiles
   the training data, one module gathered at a time), it is patched, and wrapped where a
   method says so (LoRA);
3. a plain `transformers.Trainer` trains it with `moe_sft.MoESFTCallback` (the same callback
   users add to their own Trainer / TRL scripts): per-step method work, expert-load logging,
   patched checkpoints, exact resume;
4. the final model is saved once, atomically, to `<output_dir>/final` through the Trainer's
   `save_model` (ZeRO-3 weights gathered, PEFT adapters as PEFT writes them), as a patched
   checkpoint that `moe_sft.from_pretrained` (LoRA: `moe_sft.methods.lora.load_adapter`)
   restores, with the tokenizer.
The method blocks are looped over through their plug-in hooks; no method is named here.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import shutil
import warnings
from pathlib import Path

import torch
from transformers import Trainer, TrainerCallback

from ..config import ConfigError, config_class
from ..integrations.deepspeed import is_partitioned, unpartitioned_init
from ..integrations.hf_trainer import MoESFTCallback
from ..io import atomic_directory
from ..patching import extend_patch, find_handle, patch_model
from ..plugins import Launch, Method, PrepareContext, check_config, enabled_methods
from ..pretrained import from_pretrained, read_saved_config
from . import deepspeed as ds_glue
from . import parallel
from .config import TrainConfig, load_train_config, resolve_path
from .data import SFTCollator, SFTDataset, build_dataset

logger = logging.getLogger(__name__)

PROFILE_BATCH = 8  # rows per forward of a profiling pass
TRAINER_STATE = "trainer_state.json"
# What a run writes into its output folder (removed by --overwrite; their presence means a run).
RUN_OUTPUTS = ("checkpoint-*", "final", ".final.*", "expert_load.json", "expert_load.png", "esft_selection.json", "runs")


# ---- model and tokenizer ----------------------------------------------------------------------
def load_tokenizer(cfg: TrainConfig):
    if cfg.model.tiny is not None and cfg.model.tokenizer is None:
        from ..testing import tiny_tokenizer

        return tiny_tokenizer()
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(cfg.model.tokenizer or cfg.model.path)
    if tokenizer.eos_token_id is None:
        raise ConfigError(f"tokenizer of {cfg.model.tokenizer or cfg.model.path} has no EOS token; responses could not end")
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token  # padding is masked out of attention and loss
    return tokenizer


def _dtype(name: str):
    return name if name == "auto" else getattr(torch, name)


def _load_kwargs(cfg: TrainConfig) -> dict:
    m = cfg.model
    kwargs = {"dtype": _dtype(m.dtype)}
    if m.attn_implementation is not None:
        kwargs["attn_implementation"] = m.attn_implementation
    if m.experts_implementation is not None:
        kwargs["experts_implementation"] = m.experts_implementation
    return kwargs


def _profile_batches(cfg: TrainConfig, dataset: SFTDataset):
    """A seeded random sample of `data.profile_samples` training examples, collated in batches
    (every rank draws the same sample)."""

    def batches() -> list[dict]:
        g = torch.Generator().manual_seed(cfg.training.get("seed", 42))
        n = min(cfg.data.profile_samples, len(dataset.examples))
        pick = sorted(torch.randperm(len(dataset.examples), generator=g)[:n].tolist())
        rows = [{"input_ids": dataset.examples[i][0], "labels": dataset.examples[i][1]} for i in pick]
        collate = SFTCollator(dataset.pad_id)
        return [collate(rows[i : i + PROFILE_BATCH]) for i in range(0, len(rows), PROFILE_BATCH)]

    return batches


def _prepare(model, cfg: TrainConfig, dataset: SFTDataset, resuming: bool):
    """Each enabled method's `prepare` on the loaded, unpatched model; the config to patch with."""
    methods = cfg.methods
    preparing = [(m, b) for m, b in enabled_methods(methods) if type(m).prepare is not Method.prepare]
    if not preparing:
        return methods
    if torch.cuda.is_available():  # passes over data run on this rank's GPU; the Trainer places the model later anyway
        model.to(torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0))))
    ctx = PrepareContext(batches=_profile_batches(cfg, dataset), output_dir=cfg.output_dir, resuming=resuming)
    changes = {m.name: m.prepare(block, model, ctx) for m, block in preparing}
    return dataclasses.replace(methods, **changes)


def _from_checkpoint(cfg: TrainConfig, load):
    """`load(model.path)`, or under a `parallel:` block the model sharded as transformers loads it."""
    if cfg.parallel is not None:
        return parallel.load_model(cfg.model.path, cfg.parallel, cfg.methods, **_load_kwargs(cfg))
    return load(cfg.model.path, **_load_kwargs(cfg))


def _model_config(cfg: TrainConfig):
    """The model's config.json values, without its weights."""
    if cfg.model.tiny is not None:
        from ..testing import tiny_config

        return tiny_config(cfg.model.tiny)
    from transformers import AutoConfig

    return AutoConfig.from_pretrained(cfg.model.path)


def load_model(cfg: TrainConfig, dataset: SFTDataset, resuming: bool = False):
    """(model, handle): the model patched with the YAML's blocks. A checkpoint saved by
    moe_sft is restored with its saved config; YAML blocks then change it in place where the
    method allows it (condenser phase 1 -> phase 2), or are refused."""
    m = cfg.model
    if m.tiny is not None:
        from ..testing import tiny_model

        dtype = torch.float32 if m.dtype == "auto" else _dtype(m.dtype)
        with unpartitioned_init():  # the same random start with and without ZeRO-3
            model = tiny_model(m.tiny, seed=m.seed, experts_implementation=m.experts_implementation, dtype=dtype)
        if cfg.parallel is not None:  # sharded as transformers loads it (from its state dict)
            model = parallel.load_model(model, cfg.parallel, cfg.methods, dtype=dtype)
    elif Path(m.path).is_dir() and read_saved_config(m.path) is not None:
        model = _from_checkpoint(cfg, from_pretrained)
        handle = find_handle(model)
        if cfg.methods != config_class()():
            with handle.stock_config():
                extend_patch(handle, cfg.methods)
        return model, handle
    else:
        from transformers import AutoModelForCausalLM

        model = _from_checkpoint(cfg, AutoModelForCausalLM.from_pretrained)
    if any(is_partitioned(p) for p in model.parameters()):
        logger.info("moe_sft: %s loaded partitioned (ZeRO-3 zero.Init): this rank holds its slice only", m.path)
    return model, patch_model(model, _prepare(model, cfg, dataset, resuming))


# ---- output folder and resume -------------------------------------------------------------------
def _run_outputs(out: Path) -> list[Path]:
    return sorted(p for pattern in RUN_OUTPUTS for p in out.glob(pattern)) if out.is_dir() else []


def _checkpoints(out: Path) -> list[Path]:
    """checkpoint-N folders, newest first."""
    found = [p for p in out.glob("checkpoint-*") if p.is_dir() and p.name.split("-")[-1].isdigit()]
    return sorted(found, key=lambda p: int(p.name.split("-")[-1]), reverse=True)


def _complete(ckpt: Path) -> bool:
    """The Trainer writes trainer_state.json last: without it a checkpoint was cut short."""
    try:
        json.loads((ckpt / TRAINER_STATE).read_text())
    except (OSError, ValueError):
        return False
    return True


def _resume_path(cfg: TrainConfig, resume) -> str | None:
    """None, or the checkpoint folder to resume from (`True`: the newest complete one in
    output_dir; a newer one that was cut short is skipped with a warning naming both)."""
    resume = resume if resume is not None else cfg.training.get("resume_from_checkpoint")
    if resume in (None, False):
        return None
    if resume is True or resume == "latest":
        found = _checkpoints(cfg.output_dir) if cfg.output_dir.is_dir() else []
        complete = [c for c in found if _complete(c)]
        if not complete:
            what = f"only incomplete ones ({', '.join(c.name for c in found)}, no {TRAINER_STATE})" if found else "none"
            raise ConfigError(f"--resume: no complete checkpoint-* folder in {cfg.output_dir} ({what}); train without --resume")
        if complete[0] != found[0]:
            logger.warning(
                "--resume: %s has no %s (cut short); resuming from %s, the newest complete checkpoint",
                found[0], TRAINER_STATE, complete[0],
            )  # fmt: skip
        return str(complete[0])
    path = Path(resume)
    if not path.is_dir():
        raise ConfigError(f"resume checkpoint {str(resume)!r} is not a folder")
    if not _complete(path):
        raise ConfigError(f"resume checkpoint {path} has no readable {TRAINER_STATE}: it was cut short; pick an earlier checkpoint")
    return str(path)


def _check_output_dir(cfg: TrainConfig, resuming: bool, overwrite: bool) -> None:
    """An output folder that holds a run is only reused by --resume or --overwrite (which
    removes that run's outputs first): a new run must not mix with an old one's checkpoints."""
    found = _run_outputs(cfg.output_dir)
    if not found or resuming:
        return
    if not overwrite:
        raise ConfigError(
            f"training.output_dir {str(cfg.output_dir)!r} already holds a run ({', '.join(p.name for p in found[:4])}); "
            "continue it with --resume, replace it with --overwrite, or choose another output_dir"
        )
    if int(os.environ.get("RANK", "0")) == 0:
        for p in found:
            shutil.rmtree(p) if p.is_dir() else p.unlink()
        logger.warning("--overwrite: removed the previous run's outputs in %s", cfg.output_dir)


def load_launch_config(cfg: TrainConfig) -> dict | None:
    """The run's DeepSpeed config (None without one), checked for what moe-sft train needs."""
    ds_config = ds_glue.load_config(resolve_path(cfg, cfg.deepspeed)) if cfg.deepspeed else None
    if ds_glue.zero_stage(ds_config) == 3 and not ds_config["zero_optimization"].get("stage3_gather_16bit_weights_on_model_save"):
        raise ConfigError(
            f"{cfg.deepspeed}: ZeRO-3 needs zero_optimization.stage3_gather_16bit_weights_on_model_save: true so the "
            "final model can be gathered and saved as safetensors"
        )
    return ds_config


def launch_of(cfg: TrainConfig, ds_config: dict | None) -> Launch:
    zero = (ds_config or {}).get("zero_optimization", {})
    offloaded = lambda key: zero.get(key, {}).get("device", "none") not in (None, "none")  # noqa: E731
    return Launch(
        zero_stage=ds_glue.zero_stage(ds_config),
        offload_optimizer=offloaded("offload_optimizer"),
        offload_param=offloaded("offload_param"),
        world_size=ds_glue.distributed_world_size(),
        weight_decay=float(cfg.training.get("weight_decay", 0.0) or 0.0),
        expert_parallel=cfg.parallel.ep_size if cfg.parallel is not None else 1,
    )


# ---- the job -------------------------------------------------------------------------------------
def save_final(trainer: Trainer, out: Path) -> None:
    """`trainer.save_model` into a temporary sibling of `out`, renamed once complete (the
    gathering under ZeRO-3 is a collective: every rank calls it, rank 0 writes)."""
    if trainer.args.should_save:
        with atomic_directory(out, overwrite=True) as tmp:
            trainer.save_model(str(tmp))
    else:
        trainer.save_model(str(out))  # joins the collectives; writes nothing
    trainer.accelerator.wait_for_everyone()


def train(cfg: TrainConfig, resume=None, callbacks: tuple[TrainerCallback, ...] = (), overwrite: bool = False) -> Path:
    """Run one training job; return the final model folder. `callbacks` are extra Trainer
    callbacks (e.g. `moe_sft.train.callbacks.StepTimer`), added after MoESFTCallback."""
    from transformers import TrainingArguments

    # DeepSpeed calls deprecated torch.distributed collectives on every step; one warning each is noise.
    warnings.filterwarnings("ignore", message=r"`torch\.distributed\.\w+` is deprecated", category=FutureWarning)
    ds_config = load_launch_config(cfg)
    check_config(cfg.methods, launch_of(cfg, ds_config))
    resume_from = _resume_path(cfg, resume)
    if cfg.parallel is not None:  # resolved for the launcher's world size, every check before loading
        resolved = parallel.check_job(cfg.parallel, _model_config(cfg), cfg.methods, deepspeed=cfg.deepspeed,
                                      training=cfg.training, resuming=resume_from is not None)  # fmt: skip
        cfg = dataclasses.replace(cfg, parallel=resolved)
    _check_output_dir(cfg, resume_from is not None, overwrite)
    tokenizer = load_tokenizer(cfg)
    dataset = build_dataset(tokenizer, cfg.data, lambda name: resolve_path(cfg, name))

    ds_config, extra_args = ds_glue.prepare(ds_config, cfg.training)
    training = {k: v for k, v in cfg.training.items() if k != "resume_from_checkpoint"}
    # Before the model: with a ZeRO-3 config this turns on transformers' partitioned loading
    # (deepspeed.zero.Init), so no rank but the reading one holds the whole model.
    args = TrainingArguments(**training, deepspeed=ds_config, resume_from_checkpoint=resume_from, **extra_args)
    model, handle = load_model(cfg, dataset, resuming=resume_from is not None)
    model.config.use_cache = False
    for method, _block in handle.methods():
        model = method.wrap(model, handle, handle.state.get(method.name))

    trainer = Trainer(
        model=model,
        args=args,
        train_dataset=dataset,
        data_collator=SFTCollator(tokenizer.pad_token_id),
        processing_class=tokenizer,
        callbacks=[MoESFTCallback(), *callbacks],
    )
    ds_glue.check_distributed(trainer)
    trainer.train(resume_from_checkpoint=resume_from)
    save_final(trainer, cfg.final_dir)
    logger.info("moe_sft: final model in %s", cfg.final_dir)
    return cfg.final_dir


def recipe_phases(path: str | Path, overrides: list[str] | None = None) -> list[TrainConfig]:
    """The YAML at `path` and each YAML its `then:` chain names, each starting from the previous
    phase's final model; overrides apply to the first (`deepspeed=` to every phase: it is the
    launch's)."""
    phases = [load_train_config(path, overrides)]
    launch = [o for o in overrides or [] if o.split("=", 1)[0].strip() == "deepspeed"]
    while phases[-1].then is not None:
        nxt = resolve_path(phases[-1], phases[-1].then)
        if any(nxt.resolve() == p.source.resolve() for p in phases):
            raise ConfigError(f"then: {phases[-1].then} forms a cycle")
        phases.append(load_train_config(nxt, _start_from(phases[-1].final_dir) + launch))
    return phases


def run_recipe(
    path: str | Path,
    overrides: list[str] | None = None,
    resume=None,
    callbacks: tuple[TrainerCallback, ...] = (),
    overwrite: bool = False,
) -> list[Path]:
    """Train the YAML at `path`, then each YAML its `then:` names, each starting from the
    previous phase's final model. Overrides apply to the first phase (`deepspeed=` to every
    phase: it is the launch's); `callbacks` (extra Trainer callbacks) and --overwrite to every
    phase. With --resume, a phase whose final
    model exists is skipped and the first unfinished one continues from its checkpoints."""
    phases = recipe_phases(path, overrides)  # every phase's YAML is validated before the first one starts
    if not (resume or overwrite):
        for cfg in phases:
            _check_output_dir(cfg, False, False)
    finals = []
    for i, cfg in enumerate(phases):
        if resume and (cfg.final_dir / "config.json").is_file():
            logger.info("--resume: phase %d (%s) already finished: %s", i + 1, cfg.source, cfg.final_dir)
            finals.append(cfg.final_dir)
            continue
        if i > 0:
            _reset_accelerate()
        phase_resume = resume if i == 0 else (True if resume and _checkpoints(cfg.output_dir) else None)
        finals.append(train(cfg, phase_resume, callbacks, overwrite))
    return finals


def _reset_accelerate() -> None:
    """accelerate keeps one process-wide state (and DeepSpeed plugin) per process and refuses a
    second Accelerator with a DeepSpeed plugin; the next phase's Trainer builds its own."""
    from accelerate.state import AcceleratorState

    AcceleratorState._reset_state(reset_partial_state=True)


def _start_from(model_dir: Path) -> list[str]:
    """Overrides that make a phase start from the previous phase's final model."""
    return [f"model.path={model_dir}", "model.tiny=null", "model.tokenizer=null"]
