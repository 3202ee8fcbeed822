"""Qwen1.5-MoE / Qwen2-MoE: softmax router, optional top-k renormalisation, a gated shared
expert; dense layers where `mlp_only_layers` / `decoder_sparse_step` say so."""

from moe_sft.adapters import FamilyAdapter, register_family


@register_family
class Qwen2MoeAdapter(FamilyAdapter):
    model_types = ("qwen2_moe",)
    module_path = "transformers.models.qwen2_moe.modeling_qwen2_moe"
    block_class_name = "Qwen2MoeSparseMoeBlock"
    router_class_name = "Qwen2MoeTopKRouter"
    experts_class_name = "Qwen2MoeExperts"
    shared_experts = "gated"
    expert_count_field = "num_experts"
    has_aux_loss = True
