"""DeepSeek-V2 (-Lite): fp32 softmax router, greedy or group-limited greedy top-k (group
score = best expert of the group), gate weights x routed_scaling_factor and never
renormalised, plain shared experts, the first `first_k_dense_replace` layers dense."""

from moe_sft.adapters import FamilyAdapter, PatchError, RouterSpec, register_family


@register_family
class DeepseekV2Adapter(FamilyAdapter):
    model_types = ("deepseek_v2",)
    module_path = "transformers.models.deepseek_v2.modeling_deepseek_v2"
    block_class_name = "DeepseekV2Moe"
    router_class_name = "DeepseekV2TopkRouter"
    experts_class_name = "DeepseekV2Experts"
    shared_experts = "plain"
    expert_count_field = "n_routed_experts"

    def router_spec(self, config) -> RouterSpec:
        method = config.topk_method
        if method not in ("greedy", "group_limited_greedy"):
            raise PatchError(
                f"DeepSeek-V2 topk_method {method!r} is not supported; transformers' DeepseekV2TopkRouter "
                "implements 'greedy' and 'group_limited_greedy'"
            )
        grouped = method == "group_limited_greedy"
        return RouterSpec(
            num_experts=config.n_routed_experts,
            top_k=config.num_experts_per_tok,
            score_func="softmax",
            norm_topk_prob=False,
            routed_scaling_factor=float(config.routed_scaling_factor),
            group_score="max" if grouped else "none",
            n_group=int(config.n_group or 1) if grouped else 1,
            topk_group=int(config.topk_group or 1) if grouped else 1,
            weights_fp32=True,
            sorted_topk=False,
        )
