"""OLMoE: softmax router, top-k renormalised only when `norm_topk_prob`, no shared expert,
every layer sparse."""

from moe_sft.adapters import FamilyAdapter, register_family


@register_family
class OlmoeAdapter(FamilyAdapter):
    model_types = ("olmoe",)
    module_path = "transformers.models.olmoe.modeling_olmoe"
    block_class_name = "OlmoeSparseMoeBlock"
    router_class_name = "OlmoeTopKRouter"
    experts_class_name = "OlmoeExperts"
    expert_count_field = "num_experts"
    has_aux_loss = True
