"""Qwen3-MoE (e.g. Qwen3-30B-A3B): softmax router, top-k renormalised when
`norm_topk_prob`, no shared expert."""

from moe_sft.adapters import FamilyAdapter, register_family


@register_family
class Qwen3MoeAdapter(FamilyAdapter):
    model_types = ("qwen3_moe",)
    module_path = "transformers.models.qwen3_moe.modeling_qwen3_moe"
    block_class_name = "Qwen3MoeSparseMoeBlock"
    router_class_name = "Qwen3MoeTopKRouter"
    experts_class_name = "Qwen3MoeExperts"
    expert_count_field = "num_experts"
    has_aux_loss = True
