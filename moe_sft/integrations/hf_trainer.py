"""`MoESFTCallback`: moe_sft inside any transformers Trainer (plain, TRL's SFT and GRPO, ...).

    trainer = transformers.Trainer(model=patched_model, args=args, ..., callbacks=[moe_sft.MoESFTCallback()])

It finds the patch handle from the trainer's model (through PEFT, DeepSpeed and DDP
wrappers) and, on every rank:
- at init: checks every method against the launch the TrainingArguments describe (DeepSpeed
  stage, weight decay, a TRL aux-loss coefficient against an aux-loss-free method);
- at train begin: marks the handle as driven, restores the patch's tensors when the Trainer
  resumes a checkpoint without DeepSpeed (its resume loads the stock weights only), resumes
  the expert-load totals, and runs each method's `on_train_begin`;
- after every optimizer step: `handle.step()` (the condenser's bias update, all-reduced over
  ranks; ESFT's slice restore); before a checkpoint save, the runtime weight layout for it
  (see `moe_sft.checkpoint.save_patched`) and the expert-load totals reduced over ranks, so the
  checkpoint's `trainer_state.json` carries them (the callback is an `ExportableState`);
- in every training log: expert-load metrics and the methods' own (e.g. router-bias range),
  placed before the Trainer's reporters (TensorBoard, wandb, ...) so they log them too;
- at train end: `expert_load.json` and `expert_load.png` in the output folder.
`moe-sft train` uses exactly this callback.
"""

from __future__ import annotations

import json
import logging
import os
import sys
from pathlib import Path

from transformers import TrainerCallback
from transformers.trainer_callback import CallbackHandler, DefaultFlowCallback, ExportableState

from ..checkpoint import CheckpointError, load_extra_tensors
from ..config import CONFIG_NAME, ConfigError
from ..patching import PatchHandle, find_handle
from ..plugins import Launch, check_config
from .expert_load import FILE_STEM, ExpertLoad

logger = logging.getLogger(__name__)

_STATE_KEY = "MoESFTCallback"


def launch_from_args(args) -> Launch:
    """The `Launch` a TrainingArguments (or TRL config) describes."""
    ds = getattr(args, "hf_deepspeed_config", None)
    ds = ds.config if ds is not None else args.deepspeed if isinstance(args.deepspeed, dict) else None
    if ds is None and isinstance(args.deepspeed, str) and os.path.isfile(args.deepspeed):
        ds = json.loads(Path(args.deepspeed).read_text())
    zero = (ds or {}).get("zero_optimization", {})
    offloaded = lambda key: zero.get(key, {}).get("device", "none") not in (None, "none")  # noqa: E731
    return Launch(
        zero_stage=int(zero.get("stage", 0)),
        offload_optimizer=offloaded("offload_optimizer"),
        offload_param=offloaded("offload_param"),
        world_size=int(getattr(args, "world_size", 1)),
        weight_decay=float(getattr(args, "weight_decay", 0.0) or 0.0),
        trainer="grpo" if type(args).__name__ == "GRPOConfig" else "transformers",
    )


def _callback_handler() -> CallbackHandler | None:
    """The CallbackHandler dispatching the current event (it calls us from `call_event`)."""
    frame = sys._getframe(1)
    while frame is not None:
        owner = frame.f_locals.get("self")
        if isinstance(owner, CallbackHandler):
            return owner
        frame = frame.f_back
    return None


class MoESFTCallback(TrainerCallback, ExportableState):
    """Runs every enabled moe_sft method's per-step work inside a transformers Trainer and logs
    expert load through the Trainer's reporters. `expert_load=False` skips the logging."""

    def __init__(self, expert_load: bool = True):
        self.log_expert_load = expert_load
        self.handle: PatchHandle | None = None
        self.expert_load: ExpertLoad | None = None

    # ---- setup -----------------------------------------------------------------------------
    def _find(self, model) -> PatchHandle:
        handle = find_handle(model)
        if handle is None:
            raise ConfigError(
                f"MoESFTCallback: the trainer's model ({type(model).__name__}) is not patched by moe_sft; patch it "
                "first (moe_sft.patch_model / moe_sft.from_pretrained), or drop the callback"
            )
        self.handle = handle
        return handle

    def _place_before_reporters(self) -> None:
        """Reporting callbacks come right after DefaultFlowCallback; log metrics must be in
        `logs` before they see it, and the per-step work must see DefaultFlowCallback's flags."""
        handler = _callback_handler()
        if handler is None or self not in handler.callbacks:
            logger.debug("MoESFTCallback: callback handler not found; metrics reach later callbacks only")
            return
        handler.callbacks.remove(self)
        flow = next((i for i, cb in enumerate(handler.callbacks) if isinstance(cb, DefaultFlowCallback)), -1)
        handler.callbacks.insert(flow + 1, self)

    def on_init_end(self, args, state, control, model=None, **kwargs):
        handle = self._find(model)
        self._place_before_reporters()
        handle.launch = launch_from_args(args)
        check_config(handle.config, handle.launch)
        coef = getattr(args, "router_aux_loss_coef", None)  # TRL's SFT / GRPO configs
        free = [m.name for m, _ in handle.methods() if m.aux_loss_free]
        if free and coef:
            raise ConfigError(
                f"{type(args).__name__}.router_aux_loss_coef = {coef} with {', '.join(free)}: the method is auxiliary-"
                "loss free; leave router_aux_loss_coef unset (the patched model's config says 0)"
            )

    def on_train_begin(self, args, state, control, model=None, **kwargs):
        handle = self.handle or self._find(model)
        handle.driven = True
        if self.log_expert_load and self.expert_load is None:
            self.expert_load = ExpertLoad(handle)
        if state.global_step > 0:
            self._resume(args, state, handle)
        for method, _block in handle.methods():
            method.on_train_begin(handle, handle.state.get(method.name))

    def _resume(self, args, state, handle: PatchHandle) -> None:
        saved = (state.stateful_callbacks or {}).get(_STATE_KEY)
        if self.expert_load is not None and isinstance(saved, dict):
            totals = saved.get("attributes", {}).get("expert_load_totals")
            if totals:
                self.expert_load.load_totals(totals)
        if launch_from_args(args).deepspeed or not handle.extra_keys():
            return  # DeepSpeed restores the whole module state, added tensors included
        ckpt = _resumed_checkpoint(args, state)
        if ckpt is None:
            raise CheckpointError(
                f"the Trainer resumed at step {state.global_step}, but no checkpoint folder of that step holds the "
                f"moe_sft tensors (looked for {args.output_dir}/checkpoint-{state.global_step}); set "
                "TrainingArguments(resume_from_checkpoint=PATH) to the folder you resume from"
            )
        saved_config = json.loads((ckpt / CONFIG_NAME).read_text()) if (ckpt / CONFIG_NAME).is_file() else None
        if saved_config != handle.config.to_dict():
            raise CheckpointError(
                f"{ckpt}: its {CONFIG_NAME} ({saved_config}) is not the patch being trained ({handle.config.to_dict()}); "
                "resume with the model patched as it was saved"
            )
        n = load_extra_tensors(handle, ckpt)
        logger.info("moe_sft: resumed %d moe_sft tensors from %s", n, ckpt)

    # ---- every step ----------------------------------------------------------------------------
    def on_step_end(self, args, state, control, **kwargs):
        self.handle.step()
        self._before_save(control)

    def on_epoch_end(self, args, state, control, **kwargs):
        self._before_save(control)

    def _before_save(self, control) -> None:
        if control.should_save:
            self.handle.saving_checkpoint = True
            if self.expert_load is not None:
                self.expert_load.flush()  # collective: every rank sees the same flags

    def on_save(self, args, state, control, **kwargs):
        self.handle.saving_checkpoint = False

    def state(self) -> dict:
        totals = self.expert_load.flushed_totals() if self.expert_load is not None else None
        return {"args": {"expert_load": self.log_expert_load}, "attributes": {"expert_load_totals": totals}}

    def on_log(self, args, state, control, logs=None, **kwargs):
        if logs is None or "loss" not in logs:
            return  # evaluation logs; training logs happen on every rank at the same step
        extra = self.expert_load.log_metrics() if self.expert_load is not None else {}
        for method, _block in self.handle.methods():
            extra.update(method.metrics(self.handle, self.handle.state.get(method.name)))
        logs.update(extra)
        if state.log_history and state.log_history[-1].get("step") == state.global_step:
            state.log_history[-1].update(extra)

    def on_train_end(self, args, state, control, **kwargs):
        if self.expert_load is not None:
            summary = self.expert_load.summary()  # collective
            if state.is_world_process_zero:
                ExpertLoad.write(summary, Path(args.output_dir))
                logger.info("moe_sft: expert load in %s/%s.{png,json}", args.output_dir, FILE_STEM)
            self.expert_load.remove()
            self.expert_load = None
        self.handle.driven = False


def _resumed_checkpoint(args, state) -> Path | None:
    """The checkpoint folder the Trainer resumed from: `args.resume_from_checkpoint`, else the
    output folder's checkpoint of the resumed step (what `resume_from_checkpoint=True` picks)."""
    candidates = [args.resume_from_checkpoint] if isinstance(args.resume_from_checkpoint, (str, os.PathLike)) else []
    candidates.append(os.path.join(args.output_dir, f"checkpoint-{state.global_step}"))
    for c in candidates:
        path = Path(c)
        try:
            step = json.loads((path / "trainer_state.json").read_text())["global_step"]
        except (OSError, ValueError, KeyError):
            continue
        if step == state.global_step:
            return path
    return None
