"""Logit-level MoE-Bias head with optional entropy gating (config block `moe_bias_head`).

A gating network on the final hidden state h (the output embedding's input) picks top-k of
E bias experts per token; each bias expert is a learnable vector over the vocabulary
(zero-initialised, so the patched model starts exactly at the base model); the renormalised
weighted sum of the picked vectors is added to the logits:

    p      = softmax(W_g h)                      (T, E)  fp32
    T(h)   = TopK(p, k)                          (T, k)
    w_e    = p_e / sum_{j in T(h)} p_j           for e in T(h)
    logits = lm_head(h) + sum_{e in T(h)} w_e b_e

`apply_to: top_entropy` ("Beyond the 80/20 rule", arXiv 2506.01939) adds the bias only to
tokens whose base-distribution entropy H = -sum_v q_v log q_v (q = softmax(lm_head(h))) is at
least the running (1 - rho)-quantile threshold kept in the buffer `entropy_threshold`.

A Switch-style load-balance loss keeps the bias experts used, over the tokens that received
the bias (and are not padding):

    aux = E * sum_e f_e P_e,   f_e = (#tokens whose top-k contains e) / N,   P_e = mean_t p_{t,e}

(the top-k assignment counting of transformers' Mixtral/Qwen-MoE `load_balancing_loss_func`:
sum_e f_e = k, so perfectly balanced routing gives aux = k). When the model computes a loss
(labels given), `load_balance_weight * aux` is added to it.

Installation (by `patch_model`): the head is registered on the model as `model.moe_bias_head`
(so it lands in `state_dict()` and in patched checkpoints), a forward hook on the output
embedding adds the bias to the logits, and hooks on the model pass the attention mask to the
head and add the aux term to `output.loss`. `revert()` removes all of it.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import logging
import math
import os
from pathlib import Path
from typing import Literal

import torch
from safetensors.torch import load_file, save_file
from torch import nn
from transformers.utils import ModelOutput

from ..adapters import PatchError
from ..config import ConfigError, config_class
from ..integrations import trl as trl_fused
from ..integrations.deepspeed import shape
from ..io import atomic_directory
from ..patching import PatchHandle, get_handle, patch_model
from ..plugins import Method, register_method
from ..routing import should_record_usage

logger = logging.getLogger(__name__)

ADAPTER_WEIGHTS_NAME = "moe_bias_head.safetensors"
ADAPTER_CONFIG_NAME = "moe_bias_head_config.json"

# Entropy is computed over row chunks of at most this many logits, so its fp32 temporaries
# stay small next to the (T, V) logits: on CPU chunks that stay in cache (4 MiB; 3x faster
# than one pass over 150k-token vocabularies), on accelerators bigger ones (64 MiB; few launches).
_ENTROPY_CHUNK_ELEMENTS = {"cpu": 1 << 20}
_ENTROPY_CHUNK_ELEMENTS_DEFAULT = 1 << 24


@dataclasses.dataclass
class MoEBiasHeadConfig:
    """The `moe_bias_head` block.

    num_experts          E, bias experts (vectors over the vocabulary)
    top_k                k, bias experts mixed per token
    load_balance_weight  weight of the Switch-style load-balance loss added to the training loss
    apply_to             "all": every token gets the bias; "top_entropy": only tokens whose
                         base-distribution entropy is >= the running (1 - rho)-quantile
    rho                  fraction of highest-entropy tokens that get the bias (top_entropy)
    threshold_momentum   m of the threshold's EMA: tau <- m tau + (1 - m) q_batch (first batch: tau = q)
    freeze_base          adapter mode: freeze every parameter of the model as it was before
                         patching, so only the head (and parameters other methods add) train
    """

    num_experts: int = 16
    top_k: int = 2
    load_balance_weight: float = 0.01
    apply_to: Literal["all", "top_entropy"] = "all"
    rho: float = 0.2
    threshold_momentum: float = 0.99
    freeze_base: bool = False

    def __post_init__(self):
        if self.num_experts < 1:
            raise ConfigError(f"moe_bias_head.num_experts={self.num_experts}: need at least 1 bias expert")
        if not 1 <= self.top_k <= self.num_experts:
            raise ConfigError(
                f"moe_bias_head.top_k={self.top_k} with num_experts={self.num_experts}: top_k must be in "
                f"1..num_experts; lower top_k or raise num_experts"
            )
        if not (math.isfinite(self.load_balance_weight) and self.load_balance_weight >= 0):
            raise ConfigError(
                f"moe_bias_head.load_balance_weight={self.load_balance_weight}: must be a finite number >= 0"
            )
        if not 0 < self.rho <= 1:
            raise ConfigError(f"moe_bias_head.rho={self.rho}: must be in (0, 1] (the fraction of tokens biased)")
        if not 0 <= self.threshold_momentum < 1:
            raise ConfigError(f"moe_bias_head.threshold_momentum={self.threshold_momentum}: must be in [0, 1)")


# ---- environment interface -------------------------------------------------------------

ENV_ENABLED = "MOE_BIAS_ENABLED"
_ENV_FIELDS = {  # environment variable -> (config field, parser)
    "MOE_BIAS_NUM_EXPERTS": ("num_experts", int),
    "MOE_BIAS_TOP_K": ("top_k", int),
    "MOE_BIAS_LOAD_BALANCE_WEIGHT": ("load_balance_weight", float),
}
_TRUE = ("1", "true", "yes", "on")
_FALSE = ("0", "false", "no", "off")


def _env(name: str) -> str | None:
    """The variable's value, or None when it is unset or empty."""
    value = os.environ.get(name, "").strip()
    return value or None


def resolve_config(block: MoEBiasHeadConfig | None) -> MoEBiasHeadConfig | None:
    """The `moe_bias_head` block after the MOE_BIAS_* environment overrides.

    MOE_BIAS_ENABLED=1/true/yes/on enables the head (with the defaults when the config has no
    block); 0/false/no/off disables it even if configured; unset keeps the config's choice.
    MOE_BIAS_NUM_EXPERTS / _TOP_K / _LOAD_BALANCE_WEIGHT override those fields of an enabled
    head. Empty variables count as unset. Malformed values raise ConfigError.
    """
    enabled = _env(ENV_ENABLED)
    if enabled is not None:
        if enabled.lower() in _FALSE:
            return None
        if enabled.lower() not in _TRUE:
            raise ConfigError(f"{ENV_ENABLED}={enabled!r}: expected one of {', '.join(_TRUE + _FALSE)}")
        block = block if block is not None else MoEBiasHeadConfig()
    if block is None:
        return None
    changes, used = {}, []
    for var, (field, parse) in _ENV_FIELDS.items():
        raw = _env(var)
        if raw is None:
            continue
        try:
            changes[field] = parse(raw)
        except ValueError:
            raise ConfigError(
                f"{var}={raw!r} is not a valid {parse.__name__} (it sets moe_bias_head.{field})"
            ) from None
        used.append(f"{var}={raw}")
    if not changes:
        return block
    try:
        return dataclasses.replace(block, **changes)
    except ConfigError as err:
        raise ConfigError(f"{err} (after the environment overrides {', '.join(used)})") from None


# ---- the head --------------------------------------------------------------------------


def token_entropy(logits: torch.Tensor) -> torch.Tensor:
    """Entropy (nats, fp32) of softmax(logits) per row: (T, V) -> (T,). No gradient."""
    T, V = logits.shape
    rows = max(1, _ENTROPY_CHUNK_ELEMENTS.get(logits.device.type, _ENTROPY_CHUNK_ELEMENTS_DEFAULT) // V)
    out = torch.empty(T, dtype=torch.float32, device=logits.device)
    with torch.no_grad():
        for i in range(0, T, rows):
            logp = torch.log_softmax(logits[i : i + rows].float(), dim=-1)
            out[i : i + rows] = -(logp.exp() * logp).sum(-1)
    return out


def load_balance_loss(
    probs: torch.Tensor, index: torch.Tensor, num_experts: int, mask: torch.Tensor | None = None
) -> torch.Tensor:
    """Switch-style aux loss E * sum_e f_e P_e over the N tokens `mask` (T,) bool selects (all if None).

    probs (T, E) fp32 gate probabilities; index (T, k) picked experts. f_e counts top-k
    assignments per token (sum_e f_e = k). Masked sums instead of boolean indexing, so no
    device sync; N = 0 gives 0 (still attached to the graph).
    """
    w = torch.ones(probs.shape[0], dtype=probs.dtype, device=probs.device) if mask is None else mask.to(probs.dtype)
    n = w.sum().clamp(min=1)
    counts = torch.zeros(num_experts, dtype=probs.dtype, device=probs.device)
    counts.index_add_(0, index.reshape(-1), w.repeat_interleave(index.shape[1]))
    f = counts / n  # (E,), no gradient (top-k counts)
    P = (probs * w.unsqueeze(1)).sum(0) / n  # (E,)
    return num_experts * (f * P).sum()


class MoEBiasHead(nn.Module):
    """Gate (H -> E) + bias experts (E, V) + the entropy threshold buffers.

    Parameters and buffers live on the model as `model.moe_bias_head`:
        gate.weight        (E, H)  gating network
        bias               (E, V)  bias experts, zero-initialised
        entropy_threshold  ()      fp32 running (1 - rho)-quantile of token entropies
        threshold_updates  ()      int64 number of training batches folded into the estimate
    """

    def __init__(self, hidden_size: int, vocab_size: int, config: MoEBiasHeadConfig, *, init_std: float, dtype, device):
        super().__init__()
        self.config = config
        self.gate = nn.Linear(hidden_size, config.num_experts, bias=False, dtype=dtype, device=device)
        # Small random gate so tokens spread over the experts from the start (a zero gate ties
        # every score and sends all tokens to the same k experts).
        nn.init.normal_(self.gate.weight, std=init_std)
        self.bias = nn.Parameter(torch.zeros(config.num_experts, vocab_size, dtype=dtype, device=device))
        self.register_buffer("entropy_threshold", torch.zeros((), dtype=torch.float32, device=device))
        self.register_buffer("threshold_updates", torch.zeros((), dtype=torch.int64, device=device))
        self.enabled = True  # False inside `moe_bias_disabled`: the hook leaves logits alone
        self.last_aux_loss: torch.Tensor | None = None  # raw (unweighted) aux of the last forward
        self.last_applied: torch.Tensor | None = None  # (T,) bool: tokens that got the bias
        self._attention_mask: torch.Tensor | None = None  # set by the model pre-hook
        self._fused: dict | None = None  # a TRL fused-LM-head request being answered
        self._warned_grpo = False

    def _apply(self, fn, recurse=True):
        # Casts such as `model.bfloat16()` (DeepSpeed's bf16 mode) would round the threshold to
        # bf16, whose spacing (~0.03 near 4 nats) swallows the EMA's small steps: keep it fp32.
        threshold = self.entropy_threshold
        super()._apply(fn, recurse)
        if self.entropy_threshold.dtype != torch.float32:  # keep the fp32 value, take the new device
            self.entropy_threshold = threshold.to(self.entropy_threshold.device)
        return self

    def extra_repr(self) -> str:
        c = self.config
        gating = f"top_entropy(rho={c.rho})" if c.apply_to == "top_entropy" else "all"
        return f"experts={c.num_experts}, top_k={c.top_k}, vocab={self.bias.shape[1]}, apply_to={gating}"

    def route(self, h: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """h (T, H) -> probs (T, E) fp32, index (T, k), renormalised weights (T, k) fp32."""
        probs = torch.softmax(self.gate(h).float(), dim=-1)
        top, index = torch.topk(probs, self.config.top_k, dim=-1)
        return probs, index, top / top.sum(-1, keepdim=True)

    def forward(self, h: torch.Tensor, logits: torch.Tensor, valid: torch.Tensor | None = None) -> torch.Tensor:
        """logits (..., V) computed from h (..., H) -> logits + bias, added in place; `valid`
        (...) bool marks the non-padding tokens used for the threshold estimate and the aux loss."""
        shape = logits.shape
        if logits.dim() not in (2, 3):
            raise ValueError(f"MoE-Bias head: expected logits (T, V) or (B, S, V), got shape {tuple(shape)}")
        x = h.reshape(-1, h.shape[-1])  # (T, H)
        T = x.shape[0]
        valid = torch.ones(T, dtype=torch.bool, device=logits.device) if valid is None else valid.reshape(-1)

        if self.config.apply_to == "top_entropy":
            entropy = token_entropy(logits.detach().reshape(T, -1))  # (T,)
            if should_record_usage(self):
                self._update_threshold(entropy[valid])
            applied = entropy >= self.entropy_threshold
        else:
            applied = torch.ones_like(valid)

        probs, index, weights = self.route(x)
        # (T, E) sparse mixing matrix with k non-zeros per biased row; mix @ bias never builds a
        # (T, k, V) or (T, E, V) tensor. The add is fused into the matmul and done in place on
        # the logits tensor itself (not a reshaped view, whose in-place backward would copy the
        # whole (T, V) gradient): no second (T, V) tensor; the projection's backward does not
        # need its output.
        mix = (torch.zeros_like(probs).scatter(1, index, weights) * applied.unsqueeze(1)).to(logits.dtype)
        bias = self.bias.to(logits.dtype)
        if logits.dim() == 2:
            out = logits.addmm_(mix, bias)
        else:  # (B, S, V) += (B, S, E) @ (E, V)
            out = logits.baddbmm_(mix.view(*shape[:-1], -1), bias.expand(shape[0], -1, -1))

        counted = applied & valid
        self.last_applied = applied.detach()
        self.last_aux_loss = load_balance_loss(probs, index, self.config.num_experts, counted)
        return out

    @torch.no_grad()
    def _update_threshold(self, entropy: torch.Tensor) -> None:
        """Fold this batch's (1 - rho)-quantile into the EMA; all ranks average their batch
        quantiles first so the threshold stays identical across data-parallel ranks."""
        if entropy.numel() == 0:  # this rank has no tokens: it still joins the all_reduce
            stats = torch.zeros(2, device=entropy.device)
        else:
            stats = torch.stack([torch.quantile(entropy, 1.0 - self.config.rho), torch.ones((), device=entropy.device)])
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            torch.distributed.all_reduce(stats)
        if stats[1] == 0:
            return
        q = stats[0] / stats[1]
        m = self.config.threshold_momentum
        first = self.threshold_updates == 0
        self.entropy_threshold.copy_(torch.where(first, q, m * self.entropy_threshold + (1 - m) * q))
        self.threshold_updates += 1


# ---- installation -----------------------------------------------------------------------


def get_moe_bias_layer(model: nn.Module) -> MoEBiasHead | None:
    """The model's MoE-Bias head, or None if it has none."""
    head = getattr(model, "moe_bias_head", None)
    return head if isinstance(head, MoEBiasHead) else None


def _require_head(model: nn.Module) -> MoEBiasHead:
    head = get_moe_bias_layer(model)
    if head is None:
        raise ValueError(
            f"{type(model).__name__} has no MoE-Bias head; patch it with a `moe_bias_head` config block "
            f"(or {ENV_ENABLED}=1), or load an adapter with load_moe_bias_adapter"
        )
    return head


def _hidden_mask(head: MoEBiasHead, h: torch.Tensor) -> torch.Tensor | None:
    """The (B, S) attention mask of this forward when it lines up with h (B, S, H), else None
    (e.g. generation steps with a KV cache or `logits_to_keep`, where no statistics are kept)."""
    mask = head._attention_mask
    if mask is None or h.dim() != 3 or mask.shape != h.shape[:2]:
        return None
    return mask.to(device=h.device, dtype=torch.bool)


def _answer_fused(model: nn.Module, head: MoEBiasHead, request: dict, kwargs: dict, output) -> ModelOutput:
    """The `FusedCausalLMOutput` TRL asked for, from this forward's biased logits.

    TRL's SFT loss is -sum(log_probs) / N, ignoring `loss`; the head's load-balance term joins
    it through the log-probs with value 0 (t - sg(t), spread over the labelled tokens), so the
    values stay true log-probabilities and the gradient is the plain Trainer's. Under GRPO the
    log-probs enter importance ratios, where such a term would be reweighted per token: there
    the load-balance loss is not applied (logged once)."""
    settings = trl_fused.fused_settings(model)
    wants_aux = kwargs.get("output_router_logits", getattr(model.config, "output_router_logits", False))
    out = trl_fused.fused_output(
        output.logits,
        request["labels"],
        shift_labels=request["shift_labels"],
        num_items_in_batch=request["num_items_in_batch"],
        temperature=settings["temperature"],
        outputs=settings["outputs"],
        aux_loss=getattr(output, "aux_loss", None) if wants_aux else None,
        aux_coef=float(getattr(model.config, "router_aux_loss_coef", 0.0) or 0.0),
    )
    weight, aux = head.config.load_balance_weight, head.last_aux_loss
    if aux is None or weight == 0 or not torch.is_grad_enabled():
        return out
    handle = get_handle(model)
    if handle is not None and handle.launch is not None and handle.launch.trainer == "grpo":
        if not head._warned_grpo:
            head._warned_grpo = True
            logger.warning("moe_sft: under GRPO the MoE-Bias head's load-balance loss is not applied (the policy loss is built from log-probs)")
        return out
    mask = out.label_mask
    n = request["num_items_in_batch"] if request["num_items_in_batch"] is not None else mask.sum().clamp(min=1)
    t = weight * aux.to(out.log_probs.device) * n / mask.sum().clamp(min=1)  # () per labelled token
    out.log_probs = out.log_probs - (t - t.detach()) * mask
    return out


def _install(handle: PatchHandle, cfg: MoEBiasHeadConfig) -> MoEBiasHead:
    model = handle.model
    if get_moe_bias_layer(model) is not None or hasattr(model, "moe_bias_head"):
        raise PatchError(f"{type(model).__name__} already has a `moe_bias_head` attribute; revert the patch first")
    lm_head = model.get_output_embeddings()
    weight = getattr(lm_head, "weight", None)
    if not isinstance(weight, torch.Tensor) or len(shape(weight)) != 2:
        raise PatchError(
            f"{type(model).__name__}: the MoE-Bias head needs an output embedding with a (vocab, hidden) weight; "
            f"get_output_embeddings() returned {type(lm_head).__name__}"
        )
    vocab, hidden = shape(weight)  # partitioned under ZeRO-3 loading: its real shape
    head = MoEBiasHead(
        hidden,
        vocab,
        cfg,
        init_std=getattr(model.config, "initializer_range", 0.02),
        dtype=weight.dtype,
        device=weight.device,
    )
    model.add_module("moe_bias_head", head)

    def logits_hook(module, args, output):
        if not head.enabled:
            return output
        return head(args[0], output, _hidden_mask(head, args[0]))

    def model_pre_hook(module, args, kwargs):
        mask = kwargs.get("attention_mask", args[1] if len(args) > 1 else None)
        head._attention_mask = mask if isinstance(mask, torch.Tensor) and mask.dim() == 2 else None
        head.last_aux_loss = None
        head._fused = None
        if kwargs.get("fused_lm_head") and head.enabled:
            # TRL's fused LM head would score `lm_head.weight @ h` and skip the bias: run the
            # plain forward for the logits instead and answer the fused protocol from them.
            head._fused = {k: kwargs.pop(k, None) for k in trl_fused.FUSED_KWARGS}
        return args, kwargs

    def model_hook(module, args, kwargs, output):
        head._attention_mask = None
        if head._fused is not None:
            output = _answer_fused(module, head, head._fused, kwargs, output)
            head._fused = None
        aux = head.last_aux_loss
        if aux is None or cfg.load_balance_weight == 0:
            return output
        if isinstance(output, ModelOutput):
            if output.get("loss") is not None:
                output.loss = output.loss + cfg.load_balance_weight * aux.to(output.loss.device)
        elif isinstance(output, tuple) and kwargs.get("labels") is not None:
            output = (output[0] + cfg.load_balance_weight * aux.to(output[0].device),) + output[1:]
        return output

    hooks = [
        lm_head.register_forward_hook(logits_hook),
        model.register_forward_pre_hook(model_pre_hook, with_kwargs=True),
        model.register_forward_hook(model_hook, with_kwargs=True),
    ]
    frozen = []
    if cfg.freeze_base:
        # The stock parameters: everything in the model except tensors the patch added.
        added = set(handle.extra_state_dict())
        frozen = [p for name, p in model.named_parameters() if name not in added and p.requires_grad]
        for p in frozen:
            p.requires_grad_(False)

    def undo():
        for hook in hooks:
            hook.remove()
        for p in frozen:
            p.requires_grad_(True)
        del model.moe_bias_head

    handle.add_undo(undo)
    logger.info(
        "moe_sft: MoE-Bias head %s (%d trainable parameters)%s",
        head.extra_repr(),
        sum(p.numel() for p in head.parameters()),
        f"; froze {len(frozen)} base parameters" if frozen else "",
    )
    return head


class MoEBiasHeadMethod(Method):
    name = "moe_bias_head"
    config_class = MoEBiasHeadConfig
    exports = (
        "MoEBiasHeadConfig",
        "apply_moe_bias",
        "get_moe_bias_layer",
        "load_moe_bias_adapter",
        "moe_bias_disabled",
        "save_moe_bias_adapter",
    )

    def resolve(self, block, model_config):
        return resolve_config(block)

    def apply(self, handle, block: MoEBiasHeadConfig) -> MoEBiasHead:
        return _install(handle, block)


register_method(MoEBiasHeadMethod())


# ---- the functional interface -----------------------------------------------------------


@contextlib.contextmanager
def moe_bias_disabled(model: nn.Module):
    """Within this block the model's logits are the base model's (the hook adds nothing)."""
    head = _require_head(model)
    previous, head.enabled = head.enabled, False
    try:
        yield head
    finally:
        head.enabled = previous


def apply_moe_bias(model_output: ModelOutput, model: nn.Module) -> ModelOutput:
    """`model_output` with logits = base logits + the head's bias, computed from its final
    hidden state (run the forward with `output_hidden_states=True`).

    The base logits are recomputed from `hidden_states[-1]` (the output embedding's input) with
    the head's hook off, so the result is the same whether the forward ran under
    `moe_bias_disabled(model)` or with the head hooked in (it never adds the bias twice). With
    `logits_to_keep=n` the last n positions are used. It updates no state (the entropy
    threshold is only estimated in training forwards through the hook) and leaves `loss` as it
    is; the head's aux loss of this call is in `get_moe_bias_layer(model).last_aux_loss`.
    """
    head = _require_head(model)
    hidden = getattr(model_output, "hidden_states", None)
    if not hidden or hidden[-1] is None:
        raise ValueError("apply_moe_bias needs the final hidden state: run the model with output_hidden_states=True")
    logits = model_output.logits
    h = hidden[-1][:, -logits.shape[1] :]  # (B, L, H): the positions the logits cover
    with moe_bias_disabled(model):
        base = model.get_output_embeddings()(h)
    was_training = head.training
    head.train(False)  # no threshold update
    try:
        model_output.logits = head(h, base)
    finally:
        head.train(was_training)
    return model_output


# ---- adapter mode -----------------------------------------------------------------------


def save_moe_bias_adapter(model: nn.Module, out_dir: str | os.PathLike, *, overwrite: bool = False) -> Path:
    """Write only the head: `moe_bias_head.safetensors` (its parameters and threshold buffers)
    and `moe_bias_head_config.json` (its config block and the base shapes), atomically."""
    head = _require_head(model)
    tensors = {k: v.detach().cpu().contiguous() for k, v in head.state_dict().items()}
    meta = {
        "moe_bias_head": dataclasses.asdict(head.config),
        "model_type": getattr(model.config, "model_type", None),
        "hidden_size": head.gate.weight.shape[1],
        "vocab_size": head.bias.shape[1],
    }
    out_dir = Path(out_dir)
    with atomic_directory(out_dir, overwrite=overwrite) as tmp:
        save_file(tensors, str(tmp / ADAPTER_WEIGHTS_NAME), metadata={"format": "pt"})
        (tmp / ADAPTER_CONFIG_NAME).write_text(json.dumps(meta, indent=2) + "\n")
    logger.info("moe_sft: saved MoE-Bias adapter (%d tensors) to %s", len(tensors), out_dir)
    return out_dir


def load_moe_bias_adapter(model: nn.Module, adapter_dir: str | os.PathLike) -> MoEBiasHead:
    """Load an adapter written by `save_moe_bias_adapter` onto `model` and return the head.

    An unpatched model is patched with the adapter's block; a patched model without a head
    gets one added to its patch (so adapters combine with other methods); a model that
    already has a head must have the adapter's shapes. The adapter's config is used as saved:
    MOE_BIAS_* variables that would change it are an error.
    """
    from ..config import from_dict

    adapter_dir = Path(adapter_dir)
    cfg_file, weights_file = adapter_dir / ADAPTER_CONFIG_NAME, adapter_dir / ADAPTER_WEIGHTS_NAME
    for file in (cfg_file, weights_file):
        if not file.is_file():
            raise FileNotFoundError(
                f"{file} does not exist; is {adapter_dir} a folder written by save_moe_bias_adapter?"
            )
    meta = json.loads(cfg_file.read_text())
    cfg = from_dict(MoEBiasHeadConfig, meta["moe_bias_head"], prefix="moe_bias_head.")
    if resolve_config(cfg) != cfg:
        raise ConfigError(
            f"the MOE_BIAS_* environment variables would change the config of the adapter in {adapter_dir} "
            f"({cfg}); unset them to load it"
        )
    vocab, hidden = shape(model.get_output_embeddings().weight)
    if (hidden, vocab) != (meta["hidden_size"], meta["vocab_size"]):
        raise ConfigError(
            f"adapter {adapter_dir} was trained for hidden_size={meta['hidden_size']}, vocab_size={meta['vocab_size']} "
            f"({meta['model_type']}); this {type(model).__name__} has hidden_size={hidden}, vocab_size={vocab}"
        )

    handle = get_handle(model)
    head = get_moe_bias_layer(model)
    if handle is None:
        handle = patch_model(model, config_class()(moe_bias_head=cfg))
        head = get_moe_bias_layer(model)
    elif head is None:
        head = _install(handle, cfg)
        handle.state["moe_bias_head"] = head
        handle.config = dataclasses.replace(handle.config, moe_bias_head=cfg)
        handle.refresh_extra_keys()
    elif head.config != cfg:
        raise ConfigError(
            f"{type(model).__name__} already has a MoE-Bias head configured as {head.config}; the adapter in "
            f"{adapter_dir} is {cfg}; load it onto a model without a head"
        )
    state = load_file(str(weights_file))
    head.load_state_dict(state)  # strict: names and shapes must match
    logger.info("moe_sft: loaded MoE-Bias adapter from %s", adapter_dir)
    return head
