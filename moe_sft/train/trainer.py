"""Build and run one `moe-sft train` job: tokenizer, data, model + patch, Trainer, final save.

Order matters:
1. everything that can be wrong with the input (config, DeepSpeed JSON, every data record)
   is checked before any weight is loaded;
2. the model is loaded and patched before TrainingArguments exists, i.e. outside DeepSpeed's
   ZeRO-3 `zero.Init` (patching reads parameter shapes, which zero.Init partitions away);
   DeepSpeed partitions the patched model when the Trainer initialises it;
3. the final model is saved once, atomically, to `<output_dir>/final` as a patched checkpoint
   (`moe_sft.from_pretrained` restores it), with the tokenizer.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import logging
import os
import warnings
from pathlib import Path

import torch
from transformers import PreTrainedModel, Trainer, TrainerCallback

from ..checkpoint import (
    from_pretrained,
    read_saved_config,
    save_extra_tensors,
    save_pretrained,
)
from ..config import ConfigError, MoESFTConfig
from ..io import atomic_write_text
from ..methods import enabled_methods, resolve_config
from ..patching import PatchHandle, patch_model
from . import deepspeed as ds_glue
from .config import TrainConfig, load_train_config, resolve_path
from .data import SFTCollator, SFTDataset, build_dataset
from .expert_load import FILE_STEM, ExpertLoad

logger = logging.getLogger(__name__)

PROFILE_BATCH = 8  # rows per forward of a profiling pass


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


def _is_phase2_of(saved: MoESFTConfig, wanted: MoESFTConfig) -> bool:
    """`wanted` adds condenser experts to a bias-only (phase-1) condenser model `saved`."""
    return (
        saved.condenser is not None
        and saved.condenser.condensers is None
        and wanted.condenser is not None
        and wanted.condenser.condensers is not None
        and dataclasses.replace(saved, condenser=None) == dataclasses.replace(wanted, condenser=None)
    )


def _load_patched(cfg: TrainConfig, saved: MoESFTConfig):
    """A checkpoint saved by moe_sft: continue with its own config, or start condenser phase 2."""
    from ..condenser import load_phase2
    from ..patching import get_handle

    wanted = resolve_config(cfg.methods)
    kwargs = _load_kwargs(cfg)
    if wanted == MoESFTConfig() or wanted == saved:
        model = from_pretrained(cfg.model.path, **kwargs)
    elif _is_phase2_of(saved, wanted):
        model = load_phase2(cfg.model.path, wanted.condenser, **kwargs)
    else:
        raise ConfigError(
            f"model.path {cfg.model.path} is a patched checkpoint with its own moe_sft config {saved.to_dict()}; the "
            f"YAML's method blocks {wanted.to_dict()} differ. Leave the method blocks out to continue with the saved "
            "config, add condensers to its phase-1 condenser block (phase 2), or start from the base checkpoint"
        )
    return model, get_handle(model)


def _esft_profile(model, cfg: TrainConfig, dataset: SFTDataset, resuming: bool) -> MoESFTConfig:
    """ESFT needs its expert selection before patching: profile the base model on a sample of
    the training data and write the selection (to esft.selection_file, or into output_dir)."""
    from ..esft import profile_and_select

    esft = cfg.methods.esft
    path = Path(esft.selection_file) if esft.selection_file else cfg.output_dir / "esft_selection.json"
    if path.is_file() and (esft.selection_file or resuming):  # given, or profiled by the run being resumed
        return dataclasses.replace(cfg.methods, esft=dataclasses.replace(esft, selection_file=str(path)))
    g = torch.Generator().manual_seed(cfg.training.get("seed", 42))
    n = min(cfg.data.profile_samples, len(dataset.examples))
    pick = torch.randperm(len(dataset.examples), generator=g)[:n].tolist()
    collate = SFTCollator(dataset.pad_id)
    rows = [{"input_ids": dataset.examples[i][0], "labels": dataset.examples[i][1]} for i in sorted(pick)]
    batches = [collate(rows[i : i + PROFILE_BATCH]) for i in range(0, len(rows), PROFILE_BATCH)]
    if torch.cuda.is_available():  # profile on this rank's GPU; the Trainer places the model later anyway
        model.to(torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0))))
    # Every rank profiles the same sample; the selections are compared once ranks can talk.
    profile_and_select(model, batches, esft, path)
    return dataclasses.replace(cfg.methods, esft=dataclasses.replace(esft, selection_file=str(path)))


def load_model(cfg: TrainConfig, dataset: SFTDataset, resuming: bool = False):
    """The model, patched with the YAML's method blocks (a checkpoint saved by moe_sft is
    restored with its saved config, see `_load_patched`)."""
    m = cfg.model
    if m.tiny is not None:
        from ..testing import tiny_model

        dtype = torch.float32 if m.dtype == "auto" else _dtype(m.dtype)
        model = tiny_model(m.tiny, seed=m.seed, experts_implementation=m.experts_implementation, dtype=dtype)
    else:
        saved = read_saved_config(m.path) if Path(m.path).is_dir() else None
        if saved is not None:
            return _load_patched(cfg, MoESFTConfig.from_dict(saved))
        from transformers import AutoModelForCausalLM

        model = AutoModelForCausalLM.from_pretrained(m.path, **_load_kwargs(cfg))
    methods = _esft_profile(model, cfg, dataset, resuming) if cfg.methods.esft is not None else cfg.methods
    return model, patch_model(model, methods)


# ---- trainer ------------------------------------------------------------------------------------
class MoESFTTrainer(Trainer):
    """The HF Trainer plus expert-load metrics in every training log."""

    def __init__(self, *args, expert_load: ExpertLoad | None = None, **kwargs):
        super().__init__(*args, **kwargs)
        self.expert_load = expert_load

    def _save(self, output_dir: str | None = None, state_dict: dict | None = None) -> None:
        # Trainer checkpoints exist to be resumed, and the Trainer resumes them with a plain
        # load_state_dict. transformers 5 saves some families in the hub's per-expert layout
        # (save_original_format=True), whose keys that load silently misses; keep the runtime
        # (fused) layout in checkpoints. The final model is saved in the hub layout.
        model = self.accelerator.unwrap_model(self.model, keep_torch_compile=False)
        if not isinstance(model, PreTrainedModel):
            return super()._save(output_dir, state_dict)
        model.save_pretrained = functools.partial(model.save_pretrained, save_original_format=False)
        try:
            super()._save(output_dir, state_dict)
        finally:
            del model.save_pretrained  # the instance attribute; the class method is back

    def log(self, logs: dict[str, float], start_time: float | None = None) -> None:
        # Training logs happen on every rank at the same step, so the all-reduce inside is safe.
        if self.expert_load is not None and "loss" in logs:
            logs = {**logs, **self.expert_load.log_metrics()}
        super().log(logs, start_time)


class CheckpointExtras(TrainerCallback):
    """Make every `checkpoint-N` folder a patched checkpoint too: moe_sft config + tensors
    (ZeRO-3 checkpoints hold partitioned weights; resume restores them through DeepSpeed) and
    the expert-load totals so far, which a resumed run continues from."""

    def __init__(self, handle: PatchHandle, expert_load: ExpertLoad, zero3: bool):
        self.handle, self.expert_load, self.zero3 = handle, expert_load, zero3

    def on_save(self, args, state, control, **kwargs):
        summary = self.expert_load.summary()  # collective: every rank runs on_save
        if state.is_world_process_zero:
            ckpt = Path(args.output_dir) / f"checkpoint-{state.global_step}"
            if not self.zero3:
                save_extra_tensors(self.handle, ckpt)
                self.handle.config.save(ckpt)
            atomic_write_text(ckpt / f"{FILE_STEM}.json", json.dumps(summary) + "\n")
        return control


def _resume_path(cfg: TrainConfig, resume) -> str | None:
    """None, or the checkpoint folder to resume from (`True`: the latest in output_dir)."""
    resume = resume if resume is not None else cfg.training.get("resume_from_checkpoint")
    if resume in (None, False):
        return None
    if resume is True or resume == "latest":
        from transformers.trainer_utils import get_last_checkpoint

        last = get_last_checkpoint(str(cfg.output_dir)) if cfg.output_dir.is_dir() else None
        if last is None:
            raise FileNotFoundError(f"--resume: no checkpoint-* folder in {cfg.output_dir}")
        return last
    if not Path(resume).is_dir():
        raise FileNotFoundError(f"resume checkpoint {resume!r} is not a folder")
    return str(resume)


def save_final(trainer: Trainer, handle: PatchHandle, tokenizer, out: Path, zero3: bool) -> None:
    """Save the trained model atomically as a patched checkpoint (with `lora`: the adapter, for
    `moe_sft.lora.load_adapter`). Under ZeRO-3 the weights are gathered to rank 0 first (needs
    stage3_gather_16bit_weights_on_model_save)."""
    state_dict = trainer.accelerator.get_state_dict(trainer.deepspeed) if zero3 else None  # collective
    if trainer.args.should_save:
        model = trainer.accelerator.unwrap_model(trainer.model)
        if handle.config.lora is not None:
            from ..lora import save_adapter

            save_adapter(model, out, tokenizer=tokenizer, overwrite=True)  # adapter + moe_sft config/tensors
        else:  # under ZeRO-3, from the gathered state dict (the live parameters are partitions)
            save_pretrained(model, out, tokenizer=tokenizer, overwrite=True, state_dict=state_dict)
    trainer.accelerator.wait_for_everyone()


def train(cfg: TrainConfig, resume=None, callbacks: tuple[TrainerCallback, ...] = ()) -> Path:
    """Run one training job; return the final model folder. `callbacks` are extra Trainer
    callbacks (e.g. `moe_sft.train.callbacks.TimeBudget`), added after the methods' own."""
    from transformers import TrainingArguments

    # DeepSpeed calls deprecated torch.distributed collectives on every step; one warning each is noise.
    warnings.filterwarnings("ignore", message=r"`torch\.distributed\.\w+` is deprecated", category=FutureWarning)
    ds_config = ds_glue.load_config(resolve_path(cfg, cfg.deepspeed)) if cfg.deepspeed else None
    zero3 = ds_glue.zero_stage(ds_config) == 3
    if zero3 and not ds_config["zero_optimization"].get("stage3_gather_16bit_weights_on_model_save"):
        raise ConfigError(
            f"{cfg.deepspeed}: ZeRO-3 needs zero_optimization.stage3_gather_16bit_weights_on_model_save: true so the "
            "final model can be gathered and saved as safetensors"
        )
    if cfg.methods.esft is not None and ds_config is not None and float(cfg.training.get("weight_decay", 0.0)) > 0:
        # ESFT keeps unselected expert slices bit-identical by masking their gradients and restoring
        # them after each step; DeepSpeed's optimizer decays its own fp32 master copy, out of reach.
        raise ConfigError(
            f"esft with deepspeed ({cfg.deepspeed}) and training.weight_decay={cfg.training['weight_decay']}: weight "
            "decay would change the frozen expert slices inside DeepSpeed's fp32 master weights; set "
            "training.weight_decay: 0 (as the shipped ESFT recipes do) or train without deepspeed"
        )
    if cfg.methods.lora is not None and zero3:
        raise ConfigError(
            f"lora with ZeRO-3 ({cfg.deepspeed}) is not supported yet (the adapter save reads live, partitioned "
            "parameters); use configs/deepspeed/zero2.json or no deepspeed"
        )
    resume_from = _resume_path(cfg, resume)
    tokenizer = load_tokenizer(cfg)
    dataset = build_dataset(tokenizer, cfg.data, lambda name: resolve_path(cfg, name))

    ds_config, extra_args = ds_glue.prepare(ds_config, cfg.training)
    model, handle = load_model(cfg, dataset, resuming=resume_from is not None)
    model.config.use_cache = False
    if handle.config.lora is not None:
        from ..lora import get_peft_model

        model = get_peft_model(model)  # LoRA adapters on the frozen (patched) base model
    expert_load = ExpertLoad(handle)

    training = {k: v for k, v in cfg.training.items() if k != "resume_from_checkpoint"}
    args = TrainingArguments(**training, deepspeed=ds_config, **extra_args)
    if handle.config.esft is not None:
        ds_glue.check_same_on_ranks(Path(handle.config.esft.selection_file).read_text(), "the ESFT expert selection")

    all_callbacks = [CheckpointExtras(handle, expert_load, zero3)]
    for method, block in enabled_methods(handle.config):
        if method.callbacks is not None:
            all_callbacks.extend(method.callbacks(handle, block))
    all_callbacks.extend(callbacks)
    trainer = MoESFTTrainer(
        model=model,
        args=args,
        train_dataset=dataset,
        data_collator=SFTCollator(tokenizer.pad_token_id),
        processing_class=tokenizer,
        callbacks=all_callbacks,
        expert_load=expert_load,
    )
    ds_glue.check_distributed(trainer)
    if resume_from is not None:
        totals = Path(resume_from) / f"{FILE_STEM}.json"
        if totals.is_file() and args.process_index == 0:
            expert_load.load_totals(json.loads(totals.read_text()))
    trainer.train(resume_from_checkpoint=resume_from)

    save_final(trainer, handle, tokenizer, cfg.final_dir, zero3)
    summary = expert_load.summary()
    if args.should_save:
        ExpertLoad.write(summary, cfg.output_dir)
        logger.info("moe_sft: final model in %s; expert load in %s/%s.{png,json}", cfg.final_dir, cfg.output_dir, FILE_STEM)
    return cfg.final_dir


def run_recipe(
    path: str | Path, overrides: list[str] | None = None, resume=None, callbacks: tuple[TrainerCallback, ...] = ()
) -> list[Path]:
    """Train the YAML at `path`, then each YAML its `then:` names, each starting from the
    previous phase's final model. Overrides and --resume apply to the first phase; `callbacks`
    (extra Trainer callbacks) to every phase."""
    # Every phase's YAML is validated before the first one starts.
    phases = [load_train_config(path, overrides)]
    while phases[-1].then is not None:
        nxt = resolve_path(phases[-1], phases[-1].then)
        if any(nxt.resolve() == p.source.resolve() for p in phases):
            raise ConfigError(f"then: {phases[-1].then} forms a cycle")
        phases.append(load_train_config(nxt, _start_from(phases[-1].final_dir)))
    finals = [train(phases[0], resume, callbacks)]
    for cfg in phases[1:]:
        finals.append(train(cfg, callbacks=callbacks))
    return finals


def _start_from(model_dir: Path) -> list[str]:
    """Overrides that make a phase start from the previous phase's final model."""
    return [f"model.path={model_dir}", "model.tiny=null", "model.tokenizer=null"]
