"""The family-adapter interface and the registry keyed by `config.model_type`.

A family adapter (one module per family in `patches/`) states facts about one model family:
which class is its sparse MoE block, how its router scores and selects experts (`RouterSpec`),
and what else the block adds (shared experts, input jitter). It has no method logic: the
generic routing (`moe_sft.routing`) and the patched block forward (`moe_sft.moe_forward`)
are written once against this interface.
"""

from __future__ import annotations

import dataclasses
import importlib
from typing import Literal

import torch
import transformers
from torch import nn

SUPPORTED_TRANSFORMERS = ">=5.23,<6"


class PatchError(RuntimeError):
    """The model cannot be patched; the message names the class, the missing piece and the fix."""


@dataclasses.dataclass(frozen=True)
class RouterSpec:
    """How a family's router turns logits z (T, E) into a top-k selection and gate weights.

    score_func      softmax over experts, or an element-wise sigmoid (DeepSeek-V3 style)
    norm_topk_prob  renormalise the gate weights of the experts used to sum to 1
    routed_scaling_factor  multiply the gate weights after (optional) renormalisation
    group_score     group-limited top-k: "max" (DeepSeek-V2 group_limited_greedy) or
                    "top2_sum" (DeepSeek-V3 / GLM-4.5 noaux_tc); "none" for plain top-k
    weights_fp32    keep gate weights in fp32 instead of casting them to the logits' dtype
    norm_eps        added to the renormalisation denominator (DeepSeek-V3 uses 1e-20)
    sorted_topk     `sorted=` argument of the family's torch.topk call (order of the k slots)
    """

    num_experts: int
    top_k: int
    score_func: Literal["softmax", "sigmoid"]
    norm_topk_prob: bool
    routed_scaling_factor: float = 1.0
    group_score: Literal["none", "max", "top2_sum"] = "none"
    n_group: int = 1
    topk_group: int = 1
    weights_fp32: bool = False
    norm_eps: float = 0.0
    sorted_topk: bool = True

    def __post_init__(self):
        if self.group_score != "none" and self.num_experts % self.n_group:
            raise PatchError(
                f"group-limited routing needs num_experts ({self.num_experts}) divisible by n_group ({self.n_group})"
            )


class FamilyAdapter:
    """Facts about one model family. Subclasses in `patches/` fill in the class attributes.

    module_path       transformers module that defines the family's classes
    block_class_name  the sparse MoE block (`layer.mlp` of MoE layers)
    router_class_name the router (`block.gate`); transformers records its outputs for
                      `output_router_logits`, so the patched forward must call it
    experts_class_name the fused experts (`block.experts`), dispatched by
                      `@use_experts_implementation` (eager / grouped_mm / batched_mm)
    shared_experts    "none"; "gated" (Qwen2-MoE: sigmoid(shared_expert_gate(x)) *
                      shared_expert(x)); "plain" (DeepSeek/GLM: shared_experts(x))
    has_aux_loss      the family's CausalLM adds a load-balancing aux loss
    expert_count_field  the config field holding the number of routed experts (rewritten
                      when experts are physically removed)
    """

    model_types: tuple[str, ...] = ()
    module_path: str = ""
    block_class_name: str = ""
    router_class_name: str = ""
    experts_class_name: str = ""
    shared_experts: Literal["none", "gated", "plain"] = "none"
    has_aux_loss: bool = False
    expert_count_field: str = ""

    # ---- facts with a common default --------------------------------------------------
    def router_spec(self, config) -> RouterSpec:
        """The plain softmax top-k router (Qwen-MoE, OLMoE): renormalised when the config's
        `norm_topk_prob` says so, gate weights cast to the logits' dtype. Families whose
        router differs override this."""
        return RouterSpec(
            num_experts=getattr(config, self.expert_count_field),
            top_k=config.num_experts_per_tok,
            score_func="softmax",
            norm_topk_prob=bool(config.norm_topk_prob),
        )

    def _cls(self, name: str) -> type:
        return getattr(importlib.import_module(self.module_path), name)

    @property
    def block_class(self) -> type:
        return self._cls(self.block_class_name)

    @property
    def router_class(self) -> type:
        return self._cls(self.router_class_name)

    def decoder_layers(self, model: nn.Module) -> nn.ModuleList:
        decoder = model.get_decoder() if hasattr(model, "get_decoder") else getattr(model, "model", model)
        layers = getattr(decoder, "layers", None)
        if not isinstance(layers, nn.ModuleList):
            raise PatchError(
                f"{type(model).__name__}: expected the decoder layers at `{type(decoder).__name__}.layers` "
                f"(an nn.ModuleList), found {type(layers).__name__}. {support_hint()}"
            )
        return layers

    def moe_layer_indices(self, model: nn.Module) -> list[int]:
        """Indices of decoder layers whose `mlp` is a sparse MoE block (others are dense)."""
        block_cls = self.block_class
        return [i for i, layer in enumerate(self.decoder_layers(model)) if isinstance(getattr(layer, "mlp", None), block_cls)]

    def router_logits(self, block: nn.Module, x: torch.Tensor) -> torch.Tensor:
        """Router logits z (T, E). Calls the router module itself so transformers' output
        recorder (output_router_logits, aux loss) still sees it."""
        return block.gate(x)[0]

    def selection_correction(self, block: nn.Module) -> torch.Tensor | None:
        """A bias added to the scores for selection only (DeepSeek-V3 e_score_correction_bias)."""
        return None

    def prepare_input(self, block: nn.Module, x: torch.Tensor) -> torch.Tensor:
        """Anything the family does to the block input before routing (Mixtral jitter)."""
        return x

    def shared_output(self, block: nn.Module, x: torch.Tensor) -> torch.Tensor | None:
        if self.shared_experts == "gated":
            return torch.sigmoid(block.shared_expert_gate(x)) * block.shared_expert(x)
        if self.shared_experts == "plain":
            return block.shared_experts(x)
        return None

    def shared_modules(self, block: nn.Module) -> list[nn.Module]:
        if self.shared_experts == "gated":
            return [block.shared_expert, block.shared_expert_gate]
        if self.shared_experts == "plain":
            return [block.shared_experts]
        return []

    # ---- layout check -------------------------------------------------------------------
    def validate_block(self, block: nn.Module, where: str, config) -> None:
        """Raise a PatchError naming the class and the missing piece if `block` is not laid
        out as this family's sparse MoE block in the supported transformers versions."""
        cls = type(block).__name__

        def fail(piece: str):
            raise PatchError(f"{where} ({cls}): {piece}. {support_hint()}")

        def shape(t: torch.Tensor) -> torch.Size:
            # DeepSpeed ZeRO-3 (zero.Init) partitions parameters to size 0; ds_shape is the real one.
            # A DTensor (FSDP2, expert/tensor parallelism) reports its global shape, not its shard's.
            return getattr(t, "ds_shape", t.shape)

        gate = getattr(block, "gate", None)
        experts = getattr(block, "experts", None)
        if gate is None:
            fail("no router at `.gate`")
        if not isinstance(gate, self.router_class):
            fail(f"`.gate` is a {type(gate).__name__}, expected {self.router_class_name}")
        weight = getattr(gate, "weight", None)
        if not isinstance(weight, torch.Tensor) or len(shape(weight)) != 2:
            fail("`.gate.weight` (num_experts, hidden) is missing")
        if experts is None:
            fail("no fused experts at `.experts`")
        # isinstance, not the class name: FSDP2's fully_shard swaps in a subclass (FSDP<name>),
        # expert parallelism replaces the instance's forward and makes the tensors DTensors.
        if not isinstance(experts, self._cls(self.experts_class_name)):
            fail(f"`.experts` is a {type(experts).__name__}, expected {self.experts_class_name} (or a subclass)")
        for name, ndim in (("gate_up_proj", 3), ("down_proj", 3)):
            p = getattr(experts, name, None)
            if not isinstance(p, torch.Tensor) or len(shape(p)) != ndim:
                fail(f"`.experts.{name}` is not a fused 3-D expert tensor (transformers < 5 layout?)")
        if not hasattr(type(experts).forward, "__wrapped__") or not hasattr(experts, "config"):
            fail("`.experts` is not dispatched by @use_experts_implementation")
        E = self.router_spec(config).num_experts
        counts = [shape(t)[0] for t in (weight, experts.gate_up_proj, experts.down_proj)]
        if counts != [E, E, E]:
            fail(
                f"expert count mismatch: config says {E}, gate.weight has {counts[0]}, "
                f"gate_up_proj has {counts[1]}, down_proj has {counts[2]}"
            )
        for attr in {"gated": ("shared_expert", "shared_expert_gate"), "plain": ("shared_experts",), "none": ()}[
            self.shared_experts
        ]:
            if not isinstance(getattr(block, attr, None), nn.Module):
                fail(f"no shared expert module at `.{attr}`")


_REGISTRY: dict[str, FamilyAdapter] = {}


def register_family(adapter_cls: type[FamilyAdapter]) -> type[FamilyAdapter]:
    """Class decorator used by `patches/<family>.py`: register under each of its model_types."""
    adapter = adapter_cls()
    for model_type in adapter_cls.model_types:
        if model_type in _REGISTRY:
            raise RuntimeError(f"model_type {model_type!r} registered twice")
        _REGISTRY[model_type] = adapter
    return adapter_cls


def _load_families() -> None:
    importlib.import_module("moe_sft.patches")  # each family module registers itself


def supported_model_types() -> list[str]:
    _load_families()
    return sorted(_REGISTRY)


def support_hint() -> str:
    return (
        f"Supported families (config.model_type): {', '.join(supported_model_types())}, with the fused-experts "
        f"layout of transformers {SUPPORTED_TRANSFORMERS}; installed transformers is {transformers.__version__}."
    )


def adapter_for(model_type: str | None, what: str = "model") -> FamilyAdapter:
    """The family adapter registered for `model_type` (a config's `model_type`)."""
    _load_families()
    if model_type not in _REGISTRY:
        raise PatchError(f"{what}: unsupported model_type {model_type!r}. {support_hint()}")
    return _REGISTRY[model_type]


def get_adapter(model: nn.Module) -> FamilyAdapter:
    return adapter_for(getattr(getattr(model, "config", None), "model_type", None), type(model).__name__)
