"""ESFT: expert-specialised fine-tuning (arXiv 2407.01906).

1. Profile: run a sample of the training data through the model and score every routed
   expert of every MoE layer (per sample s with n_s non-padding tokens, then averaged over
   samples):
       ESFT-Gate   g_i = mean_s (1/n_s) sum_t w_{i,t}            w = the gate weight the model
                                                                  uses (0 if i not selected)
       ESFT-Token  r_i = mean_s (1/n_s) sum_t 1[i in T_t] / k
   normalised per layer to sum to 1 (`normalize: per_layer`, the paper), or as the official
   code does (`normalize: global`: each expert id's scores divided by their sum over layers).
2. Select per layer: experts in descending score until the cumulative score reaches p; the
   expert that crosses p is included. Saved as JSON `{"experts": {layer: [ids]}, ...}` (the
   layout of the official `expert_cfg.json`), which users can read and edit.
3. Train only the selected experts. Experts are fused (E, 2I, H) / (E, H, I) tensors, so the
   unit of freezing is a slice: the gradient of every unselected slice is zeroed by a tensor
   hook (optimizer moments stay exactly 0 there), and the unselected slices are restored
   from a snapshot after every optimizer step (`restore_frozen`, run by the trainer callback),
   which undoes weight decay (AdamW decays every element it owns, gradient or not). Router,
   attention, embeddings, lm_head, norms, dense MLPs and shared experts get requires_grad False
   unless `train_non_expert_modules` / `train_shared_experts` say otherwise.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
from typing import Iterable, Literal

import torch
from torch import nn

from ..config import ConfigError
from ..integrations.deepspeed import is_partitioned, layerwise_forward, shape
from ..io import atomic_write_text
from ..plugins import Method, PrepareContext, register_method

logger = logging.getLogger(__name__)

DEFAULT_TOP_P = {"token": 0.2, "gate": 0.1}


@dataclasses.dataclass
class ESFTConfig:
    """`esft:` block.

    score           which score selects the experts: token (ESFT-Token) or gate (ESFT-Gate)
    top_p           cumulative score threshold p per layer (default: token 0.2, gate 0.1)
    normalize       per_layer (the paper) or global (the official code: per expert id, over layers)
    selection_file  JSON selection written by `save_selection` (required to train)
    train_shared_experts      also train the shared experts
    train_non_expert_modules  also train attention, router, norms, embeddings, lm_head, dense MLPs
    """

    score: Literal["token", "gate"] = "token"
    top_p: float | None = None
    normalize: Literal["per_layer", "global"] = "per_layer"
    selection_file: str | None = None
    train_shared_experts: bool = False
    train_non_expert_modules: bool = False

    def __post_init__(self):
        if self.top_p is None:
            self.top_p = DEFAULT_TOP_P[self.score]
        if not 0.0 < self.top_p <= 1.0:
            raise ConfigError(f"esft.top_p must be in (0, 1], got {self.top_p}")


# ---- 1. profiling -----------------------------------------------------------------------------
class _ScoreRecorder:
    """Routing observer of one layer accumulating per-sample mean gate weight / token share
    per expert (ESFT's own reduction of the routing record)."""

    def __init__(self, num_experts: int):
        self.gate = torch.zeros(num_experts, dtype=torch.float64)
        self.token = torch.zeros(num_experts, dtype=torch.float64)
        self.samples = 0
        self.mask: torch.Tensor | None = None  # (B, S) attention mask of the current batch

    def __call__(self, routing) -> None:
        k = routing.num_routed
        idx = routing.index[:, :k].cpu()  # (T, k), routed picks only
        w = routing.weights[:, :k].detach().double().cpu()  # (T, k)
        mask = self.mask.to(torch.float64)  # (B, S)
        B, S = mask.shape
        E = self.gate.numel()
        gate = torch.zeros(B * S, E, dtype=torch.float64).scatter_add_(1, idx, w)  # (T, E)
        token = torch.zeros(B * S, E, dtype=torch.float64).scatter_add_(1, idx, torch.full_like(w, 1.0 / k))
        n = mask.sum(1, keepdim=True).clamp_min(1)  # (B, 1) real tokens per sample
        m = mask.reshape(B, S, 1)
        self.gate += ((gate.view(B, S, E) * m).sum(1) / n).sum(0)
        self.token += ((token.view(B, S, E) * m).sum(1) / n).sum(0)
        self.samples += int((mask.sum(1) > 0).sum())


@torch.no_grad()
def esft_profile(model: nn.Module, batches: Iterable[dict], *, progress: bool = True) -> dict:
    """Raw (unnormalised) ESFT scores: {"gate": {layer: [E floats]}, "token": {...}, "samples": N}.

    `batches` yields dicts with `input_ids` (B, S) and optionally `attention_mask` (padding
    tokens, mask 0, are excluded). Runs the model in eval mode without gradient; a model that is
    not patched is patched for the pass and reverted after.
    """
    from tqdm.auto import tqdm

    from ..patching import get_handle, patch_model

    handle = get_handle(model)
    own = handle is None
    if own:
        handle = patch_model(model)
    recorders = {m.layer_idx: _ScoreRecorder(m.controls.spec.num_experts) for m in handle.layers}
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    try:
        # A ZeRO-3-partitioned model (partitioned loading) is gathered one module at a time.
        with handle.observing(lambda i, routing, x, block: recorders[i](routing)), layerwise_forward(model):
            for batch in tqdm(batches, desc="ESFT profiling", disable=not progress):
                ids = batch["input_ids"]
                mask = batch.get("attention_mask")
                mask = torch.ones_like(ids) if mask is None else mask
                for r in recorders.values():
                    r.mask = mask
                model(input_ids=ids.to(device), attention_mask=mask.to(device))
    finally:
        model.train(was_training)
        if own:
            handle.revert()
    samples = next(iter(recorders.values())).samples
    if samples == 0:
        raise ValueError("esft_profile: the batches held no non-padding tokens; pass a sample of the training data")
    return {
        "gate": {i: (r.gate / r.samples).tolist() for i, r in recorders.items()},
        "token": {i: (r.token / r.samples).tolist() for i, r in recorders.items()},
        "samples": samples,
    }


def normalize_scores(scores: dict[int, list[float]], how: str = "per_layer") -> dict[int, list[float]]:
    """per_layer: each layer sums to 1. global: each expert id divided by its sum over layers
    (what the official ESFT `generate_expert_config.py` does, np.sum(axis=0))."""
    layers = sorted(scores)
    mat = torch.tensor([scores[i] for i in layers], dtype=torch.float64)  # (L, E)
    if how == "per_layer":
        mat = mat / mat.sum(dim=1, keepdim=True).clamp_min(1e-300)
    elif how == "global":
        mat = mat / mat.sum(dim=0, keepdim=True).clamp_min(1e-300)
    else:
        raise ConfigError(f"esft.normalize must be 'per_layer' or 'global', got {how!r}")
    return {i: row.tolist() for i, row in zip(layers, mat)}


def select_experts(scores: dict[int, list[float]], top_p: float) -> dict[int, list[int]]:
    """Per layer: experts in descending score (ties: lower id first) until the cumulative
    score reaches `top_p`, the expert that crosses it included."""
    selection = {}
    for layer, row in scores.items():
        order = sorted(range(len(row)), key=lambda e: (-row[e], e))
        chosen, total = [], 0.0
        for e in order:
            if total >= top_p:
                break
            chosen.append(e)
            total += row[e]
        selection[layer] = sorted(chosen)
    return selection


def save_selection(path: str | os.PathLike, selection: dict[int, list[int]], **meta) -> None:
    """Write `{"experts": {layer: [ids]}, **meta}` atomically (meta: score, top_p, scores, ...)."""
    data = {"experts": {str(k): [int(e) for e in v] for k, v in sorted(selection.items())}, **meta}
    atomic_write_text(path, json.dumps(data, indent=1) + "\n")


def load_selection(path: str | os.PathLike, handle=None) -> dict[int, list[int]]:
    """Read a selection JSON; with `handle`, check every layer is a patched MoE layer and every
    expert id exists there."""
    path = str(path)
    if not os.path.isfile(path):
        raise ConfigError(f"esft.selection_file {path!r} does not exist; create it with moe_sft.esft.save_selection")
    try:
        raw = json.loads(open(path).read())["experts"]
        selection = {int(k): [int(e) for e in v] for k, v in raw.items()}
    except (ValueError, KeyError, TypeError, AttributeError) as err:
        raise ConfigError(f"{path}: not an ESFT selection ({{\"experts\": {{layer: [expert ids]}}}}): {err}") from None
    if handle is not None:
        sizes = {m.layer_idx: m.controls.spec.num_experts for m in handle.layers}
        for layer, experts in selection.items():
            if layer not in sizes:
                raise ConfigError(f"{path}: layer {layer} is not a sparse MoE layer of this model; MoE layers: {sorted(sizes)}")
            bad = sorted({e for e in experts if not 0 <= e < sizes[layer]})
            if bad:
                raise ConfigError(f"{path}: layer {layer} names expert(s) {bad}; this layer has experts 0..{sizes[layer] - 1}")
            if len(set(experts)) != len(experts):
                raise ConfigError(f"{path}: layer {layer} lists an expert twice: {experts}")
    return selection


def profile_and_select(model: nn.Module, batches: Iterable[dict], cfg: ESFTConfig, path: str | os.PathLike, progress: bool = True) -> dict[int, list[int]]:
    """Profile, normalise, select with `cfg` and save the selection (with the scores) to `path`."""
    raw = esft_profile(model, batches, progress=progress)
    scores = normalize_scores(raw[cfg.score], cfg.normalize)
    selection = select_experts(scores, cfg.top_p)
    save_selection(
        path,
        selection,
        score=cfg.score,
        top_p=cfg.top_p,
        normalize=cfg.normalize,
        samples=raw["samples"],
        shared_experts=cfg.train_shared_experts,
        non_expert_modules=cfg.train_non_expert_modules,
        scores={str(k): [round(v, 6) for v in row] for k, row in scores.items()},
    )
    logger.info("moe_sft: ESFT-%s selection (p=%s) saved to %s: %s experts", cfg.score, cfg.top_p, path, sum(map(len, selection.values())))
    return selection


# ---- 3. freezing --------------------------------------------------------------------------------
def _numel(t: torch.Tensor) -> int:
    return getattr(t, "ds_numel", t.numel())


class ESFTState:
    """The trainable expert slices of a patched model and the snapshot of the frozen ones.

    The restore after each step undoes what touches elements without gradient (weight decay).
    A parameter that is partitioned (ZeRO-3) or on the meta device has no values here to
    snapshot: under DeepSpeed weight decay is refused, and Adam's update of an element whose
    gradient was always masked to 0 is exactly 0, so its slices stay bit-identical anyway."""

    def __init__(self):
        self.slices: list[tuple[nn.Parameter, torch.Tensor, torch.Tensor | None]] = []  # (param, frozen ids, snapshot)
        self.trainable = 0

    def add(self, param: nn.Parameter, selected: list[int]) -> None:
        dims = shape(param)
        frozen = torch.tensor([e for e in range(dims[0]) if e not in set(selected)], dtype=torch.long)
        snapshot = None
        if not (is_partitioned(param) or param.is_meta):
            frozen = frozen.to(param.device)
            snapshot = param.detach()[frozen].to("cpu", copy=True)  # kept off the accelerator
        self.slices.append((param, frozen, snapshot))
        self.trainable += dims[1:].numel() * len(selected)

    @torch.no_grad()
    def restore(self) -> None:
        for param, frozen, snapshot in self.slices:
            if snapshot is not None and frozen.numel() and not is_partitioned(param):
                param.index_copy_(0, frozen, snapshot.to(param.device, param.dtype))


def _grad_mask_hook(mask: torch.Tensor):
    def hook(grad):
        return grad * mask.to(grad.dtype)

    return hook


def _install(handle, cfg: ESFTConfig) -> ESFTState:
    selection = load_selection(cfg.selection_file, handle)
    model = handle.model
    before = {p: p.requires_grad for p in model.parameters()}
    hooks = []
    state = ESFTState()

    # Every stock parameter frozen first (what other methods added keeps its own setting, e.g.
    # a MoE-Bias head); then re-enable what this config trains.
    added = handle.extra_keys()
    for name, p in model.named_parameters():
        if name not in added:
            p.requires_grad_(cfg.train_non_expert_modules)
    for m in handle.layers:
        experts = m.block.experts
        chosen = selection.get(m.layer_idx, [])
        for p in (experts.gate_up_proj, experts.down_proj):
            p.requires_grad_(bool(chosen))
            if chosen:
                mask = torch.zeros(shape(p)[0], 1, 1, device=p.device)
                mask[chosen] = 1.0
                hooks.append(p.register_hook(_grad_mask_hook(mask)))
                state.add(p, chosen)
        for shared in handle.adapter.shared_modules(m.block):
            for p in shared.parameters():
                p.requires_grad_(cfg.train_shared_experts)
    state.trainable += sum(
        _numel(p) for p in model.parameters() if p.requires_grad and not any(p is s[0] for s in state.slices)
    )
    # With the embeddings frozen, the first layers' inputs carry no gradient; ZeRO-3 then never
    # gathers their (partitioned) weights for the backward the trainable experts need, so the
    # embedding output is made to require grad (what PEFT does for the same reason).
    frozen_inputs = not cfg.train_non_expert_modules and hasattr(model, "enable_input_require_grads")
    if frozen_inputs:
        model.enable_input_require_grads()

    def undo():
        for h in hooks:
            h.remove()
        if frozen_inputs:
            model.disable_input_require_grads()
        for p, flag in before.items():
            p.requires_grad_(flag)

    handle.add_undo(undo)
    total = sum(_numel(p) for p in model.parameters())
    logger.info(
        "moe_sft: ESFT-%s trains %d experts in %d layers: %d of %d parameters (%.2f%%)",
        cfg.score,
        sum(map(len, selection.values())),
        sum(1 for v in selection.values() if v),
        state.trainable,
        total,
        100.0 * state.trainable / total,
    )
    return state


def _state(model: nn.Module) -> ESFTState:
    from ..patching import find_handle

    handle = find_handle(model)
    if handle is None or handle.config.esft is None:
        raise ValueError("this model is not patched with an esft config block")
    return handle.state["esft"]


def trainable_parameters(model: nn.Module) -> int:
    """Parameters ESFT trains in `model` (selected expert slices + whatever the flags unfreeze)."""
    return _state(model).trainable


def restore_frozen(model: nn.Module) -> None:
    """Put the unselected expert slices back to their values at patch time. Call it after every
    optimizer step when not using MoESFTCallback / moe_sft.step (it undoes weight decay on them)."""
    _state(model).restore()


SELECTION_NAME = "esft_selection.json"


class ESFT(Method):
    name = "esft"
    config_class = ESFTConfig
    exports = ("ESFTConfig",)

    def check(self, config, launch) -> None:
        cfg = config.esft
        if cfg.selection_file is not None and not os.path.isfile(cfg.selection_file):
            raise ConfigError(
                f"esft.selection_file {cfg.selection_file!r} does not exist; fix the path, or leave selection_file out "
                "to profile the training data and write the selection into the output folder"
            )
        if launch is not None and launch.deepspeed and launch.weight_decay > 0:
            # Unselected slices stay bit-identical by masked gradients plus a restore after each step;
            # DeepSpeed's optimizer decays its own fp32 master copy, out of the restore's reach.
            raise ConfigError(
                f"esft with DeepSpeed ZeRO-{launch.zero_stage} and weight_decay={launch.weight_decay}: weight decay would "
                "change the frozen expert slices inside DeepSpeed's fp32 master weights; set weight_decay: 0 (as the "
                "shipped ESFT recipes do) or train without DeepSpeed"
            )

    def prepare(self, block: ESFTConfig, model, ctx: PrepareContext) -> ESFTConfig:
        """ESFT needs its expert selection before patching: profile the base model on a sample
        of the training data and write the selection into the output folder (unless given, or
        written by the run being resumed)."""
        if block.selection_file is not None:
            return block
        path = os.path.join(str(ctx.output_dir), SELECTION_NAME)
        if not (ctx.resuming and os.path.isfile(path)):
            profile_and_select(model, ctx.batches(), block, path)
        return dataclasses.replace(block, selection_file=path)

    def apply(self, handle, block: ESFTConfig) -> ESFTState:
        if block.selection_file is None:
            raise ConfigError(
                "esft.selection_file is required to train with ESFT: profile first with "
                "moe_sft.methods.esft.profile_and_select(model, batches, cfg, 'selection.json') and set esft.selection_file"
            )
        return _install(handle, block)

    def on_train_begin(self, handle, state: ESFTState) -> None:
        # Every rank must train the same experts (each profiled its own copy of the sample).
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            mine = open(handle.config.esft.selection_file).read()
            texts = [None] * torch.distributed.get_world_size()
            torch.distributed.all_gather_object(texts, mine)
            if any(t != texts[0] for t in texts):
                raise RuntimeError("the ESFT expert selection differs between ranks; compute it once and pass esft.selection_file")

    def on_step(self, handle, state: ESFTState) -> None:
        state.restore()


register_method(ESFT())
