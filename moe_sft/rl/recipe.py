"""Build and run one `moe-sft rl` job: prompts and rewards, model + patch, MoEGRPOTrainer, final save.

The same order as `moe-sft train` (and its functions, imported from `moe_sft.train.trainer`):
1. everything that can be wrong with the input (config, DeepSpeed JSON, the method blocks
   against the launch, the output folder, every prompt and gold answer, the reward functions)
   is checked before any weight is loaded;
2. the model is loaded, methods whose `prepare` needs data (ESFT's expert selection) see
   rollouts of the training prompts, it is patched, and wrapped where a method says so (LoRA);
3. `MoEGRPOTrainer` (TRL's GRPO with routing replay) trains it with `moe_sft.MoESFTCallback`;
4. the final model goes to `<output_dir>/final`: a patched checkpoint as `moe-sft train` writes
   it, or, for the MoE-Bias head alone on a frozen base, just the head (the small adapter of
   `moe_sft.save_moe_bias_adapter`, loaded by `moe-sft eval --adapter`).
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import logging
import warnings
from pathlib import Path

import torch
from transformers import TrainerCallback

from ..config import ConfigError, config_class
from ..integrations.hf_trainer import MoESFTCallback
from ..patching import patch_model
from ..plugins import Method, check_config, enabled_methods
from ..pretrained import read_saved_config
from ..train import deepspeed as ds_glue
from ..train.config import TrainConfig, resolve_path
from ..train.trainer import (
    PROFILE_BATCH,
    _check_output_dir,
    _prepare,
    _resume_path,
    launch_of,
    load_launch_config,
    load_model,
    load_tokenizer,
    save_final,
)
from .config import RLConfig, load_rl_config
from .rewards import build_rewards, check_golds
from .trainer import MoEGRPOTrainer

logger = logging.getLogger(__name__)


@dataclasses.dataclass
class RLResult:
    """What `train_rl` returns: the final model folder and the Trainer's log history (one dict
    per logged step, TRL's metrics and moe_sft's: routing/*, ratio/*, entropy_mask/*, expert_load/*)."""

    final_dir: Path
    log_history: list[dict]


# ---- prompts --------------------------------------------------------------------------------------
def load_prompts(cfg: RLConfig, tokenizer, view: TrainConfig) -> list:
    """Every (prompt, gold answer) of `data:`, checked: gold answers the accuracy rewards can
    judge, prompts within data.max_length tokens (a cut prompt would lose its question)."""
    from ..data import rl_prompts

    prompts = rl_prompts(tokenizer, cfg.data, lambda name: resolve_path(view, name))
    if not prompts:
        raise ConfigError("data: no prompts found; list files of LLM-Adapters (instruction/answer) or GSM8K (question/answer) records")
    check_golds(cfg.rewards, prompts)
    lengths = [len(ids) for ids in tokenizer([p.prompt for p in prompts])["input_ids"]]
    longest = max(range(len(prompts)), key=lengths.__getitem__)
    if lengths[longest] > cfg.data.max_length:
        raise ConfigError(
            f"{prompts[longest].where}: the prompt is {lengths[longest]} tokens, more than data.max_length="
            f"{cfg.data.max_length}; raise data.max_length or drop the record (RL prompts are not truncated)"
        )
    return prompts


# ---- the model ---------------------------------------------------------------------------------------
class RolloutSample:
    """Rollouts of a seeded sample of the training prompts, as the rows `moe-sft train`'s
    profiling passes read (`examples`: (input_ids, labels) pairs, the prompt labelled -100):
    what ESFT selects its experts from in RL. Generated on first use, one completion per
    prompt, with the run's sampling settings."""

    def __init__(self, model, tokenizer, prompts: list, cfg: RLConfig):
        self.model, self.tokenizer, self.prompts, self.cfg = model, tokenizer, prompts, cfg
        self.pad_id = tokenizer.pad_token_id

    @functools.cached_property
    def examples(self) -> list[tuple[list[int], list[int]]]:
        g = self.cfg.grpo
        seed = g.get("seed", 42)
        pick = torch.randperm(len(self.prompts), generator=torch.Generator().manual_seed(seed))[: self.cfg.data.profile_samples]
        texts = [self.prompts[i].prompt for i in sorted(pick.tolist())]
        torch.manual_seed(seed)  # the same rollouts on every rank
        device = self.model.get_input_embeddings().weight.device
        sampling = dict(do_sample=True, temperature=g.get("temperature", 1.0), top_p=g.get("top_p", 1.0), top_k=g.get("top_k", 0) or None,
                        max_new_tokens=g.get("max_completion_length", 512), pad_token_id=self.pad_id)  # fmt: skip
        out = []
        with torch.no_grad():
            for start in range(0, len(texts), PROFILE_BATCH):
                enc = self.tokenizer(texts[start : start + PROFILE_BATCH], return_tensors="pt", padding=True, padding_side="left").to(device)
                new = self.model.generate(**enc, **sampling, output_router_logits=False)[:, enc["input_ids"].shape[1] :]  # (b, C)
                for row, mask, generated in zip(enc["input_ids"], enc["attention_mask"], new):
                    prompt = row[mask.bool()].tolist()
                    completion = _until_eos(generated.tolist(), self.tokenizer.eos_token_id)
                    out.append((prompt + completion, [-100] * len(prompt) + completion))
        logger.info("moe_sft: %d rollouts of the training prompts for the methods' profiling pass", len(out))
        return out


def _until_eos(ids: list[int], eos: int) -> list[int]:
    """Generated ids up to and including the first EOS (generate pads the rows that finished first)."""
    return ids[: ids.index(eos) + 1] if eos in ids else ids


def load_policy(cfg: RLConfig, view: TrainConfig, tokenizer, prompts: list, resuming: bool):
    """(model, handle): the model patched with the YAML's blocks, as `moe-sft train` loads it,
    except that methods preparing on data (ESFT) see rollouts of the training prompts instead of
    SFT examples: the model is loaded with every method off, unpatched, sampled, then patched."""
    needs_data = any(type(m).prepare is not Method.prepare for m, _ in enabled_methods(cfg.methods))
    saved = cfg.model.path is not None and Path(cfg.model.path).is_dir() and read_saved_config(cfg.model.path) is not None
    if not needs_data or saved:  # a saved checkpoint keeps its own (already prepared) blocks
        return load_model(view, None, resuming)
    model, handle = load_model(dataclasses.replace(view, methods=config_class()()), None, resuming)
    handle.revert()
    methods = _prepare(model, view, RolloutSample(model, tokenizer, prompts, cfg), resuming)
    return model, patch_model(model, methods)


# ---- the job --------------------------------------------------------------------------------------------
def _grpo_args(cfg: RLConfig, weights: list[float], ds_config, extra: dict, resume_from):
    from trl import GRPOConfig

    grpo = {k: v for k, v in cfg.grpo.items() if k != "resume_from_checkpoint"}
    try:
        return GRPOConfig(**grpo, reward_weights=weights, deepspeed=ds_config, resume_from_checkpoint=resume_from, **extra)
    except ValueError as e:  # TRL's own consistency checks
        raise ConfigError(f"grpo: {e}") from None


def _is_adapter_run(handle) -> bool:
    """The MoE-Bias head alone on a frozen base: the head is all that trains."""
    head = handle.config.moe_bias_head
    return [m.name for m, _ in handle.methods()] == ["moe_bias_head"] and head.freeze_base


def save_policy(trainer, handle, out: Path) -> None:
    """The final model: the head's small adapter in adapter mode (gathered first under ZeRO-3),
    else the patched checkpoint `moe-sft train` writes (`save_final`)."""
    if not _is_adapter_run(handle):
        save_final(trainer, out)
        return
    from ..methods.moe_bias_head import get_moe_bias_layer, save_moe_bias_adapter

    head = get_moe_bias_layer(handle.model)
    gathered = contextlib.nullcontext()
    if handle.launch is not None and handle.launch.zero_stage == 3:
        import deepspeed

        gathered = deepspeed.zero.GatheredParameters(list(head.parameters()))
    with gathered:
        if trainer.args.should_save:
            save_moe_bias_adapter(handle.model, out, overwrite=True)
    trainer.accelerator.wait_for_everyone()


def train_rl(cfg: RLConfig, resume=None, callbacks: tuple[TrainerCallback, ...] = (), overwrite: bool = False) -> RLResult:
    """Run one RL job (see the module docstring). `callbacks` are extra Trainer callbacks,
    added after MoESFTCallback; `resume`: True (newest checkpoint) or a checkpoint folder."""
    from datasets import Dataset

    warnings.filterwarnings("ignore", message=r"`torch\.distributed\.\w+` is deprecated", category=FutureWarning)
    view = cfg.as_train_config()
    ds_config = load_launch_config(view)
    check_config(cfg.methods, dataclasses.replace(launch_of(view, ds_config), trainer="grpo"))
    resume_from = _resume_path(view, resume)
    _check_output_dir(view, resume_from is not None, overwrite)
    tokenizer = load_tokenizer(view)
    prompts = load_prompts(cfg, tokenizer, view)
    reward_funcs, weights = build_rewards(cfg.rewards)

    ds_config, extra = ds_glue.prepare(ds_config, cfg.grpo)
    model, handle = load_policy(cfg, view, tokenizer, prompts, resuming=resume_from is not None)
    for method, _block in handle.methods():
        model = method.wrap(model, handle, handle.state.get(method.name))
    args = _grpo_args(cfg, weights, ds_config, extra, resume_from)
    trainer = MoEGRPOTrainer(
        model=model,
        reward_funcs=reward_funcs,
        args=args,
        train_dataset=Dataset.from_list([{"prompt": p.prompt, "answer": p.answer} for p in prompts]),
        processing_class=tokenizer,
        callbacks=[MoESFTCallback(), *callbacks],
        routing_replay=cfg.routing_replay,
        routing_metrics=cfg.routing_metrics,
    )
    ds_glue.check_distributed(trainer)
    trainer.train(resume_from_checkpoint=resume_from)
    save_policy(trainer, handle, cfg.final_dir)
    logger.info("moe_sft: final %s in %s", "MoE-Bias adapter" if _is_adapter_run(handle) else "model", cfg.final_dir)
    return RLResult(cfg.final_dir, trainer.state.log_history)


def run_rl(path: str | Path, overrides: list[str] | None = None, resume=None, callbacks: tuple[TrainerCallback, ...] = (),
           overwrite: bool = False) -> RLResult:  # fmt: skip
    """`moe-sft rl PATH [key=value ...]`: read and validate the YAML, then `train_rl`."""
    return train_rl(load_rl_config(path, overrides), resume=resume, callbacks=callbacks, overwrite=overwrite)
