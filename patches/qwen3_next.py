"""Qwen3-Next: the Qwen2-MoE routing (softmax, optional renormalisation, gated shared
expert) under hybrid linear/full attention."""

from moe_sft.adapters import FamilyAdapter, register_family


@register_family
class Qwen3NextAdapter(FamilyAdapter):
    model_types = ("qwen3_next",)
    module_path = "transformers.models.qwen3_next.modeling_qwen3_next"
    block_class_name = "Qwen3NextSparseMoeBlock"
    router_class_name = "Qwen3NextTopKRouter"
    experts_class_name = "Qwen3NextExperts"
    shared_experts = "gated"
    expert_count_field = "num_experts"
    has_aux_loss = True
