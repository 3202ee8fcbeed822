"""DeepSeek-V3 style routing (sigmoid scores, e_score_correction_bias for selection only,
group-limited top-k with group score = sum of the group's top-2, renormalised when
`norm_topk_prob`, x routed_scaling_factor), plain shared experts, first layers dense."""

from moe_sft.adapters import FamilyAdapter, RouterSpec, register_family


class SigmoidGroupRouterAdapter(FamilyAdapter):
    """Shared by the families whose router is DeepSeek-V3's noaux_tc router."""

    shared_experts = "plain"
    expert_count_field = "n_routed_experts"

    def router_spec(self, config) -> RouterSpec:
        return RouterSpec(
            num_experts=config.n_routed_experts,
            top_k=config.num_experts_per_tok,
            score_func="sigmoid",
            norm_topk_prob=bool(config.norm_topk_prob),
            routed_scaling_factor=float(config.routed_scaling_factor),
            group_score="top2_sum",
            n_group=int(config.n_group or 1),
            topk_group=int(config.topk_group or 1),
            weights_fp32=True,
            norm_eps=1e-20,
            sorted_topk=False,
        )

    def selection_correction(self, block):
        return block.gate.e_score_correction_bias


@register_family
class DeepseekV3Adapter(SigmoidGroupRouterAdapter):
    model_types = ("deepseek_v3",)
    module_path = "transformers.models.deepseek_v3.modeling_deepseek_v3"
    block_class_name = "DeepseekV3MoE"
    router_class_name = "DeepseekV3TopkRouter"
    experts_class_name = "DeepseekV3Experts"
