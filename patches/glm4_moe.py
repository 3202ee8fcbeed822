"""GLM-4.5 / GLM-4-MoE: DeepSeek-V3's sigmoid group-limited router and plain shared experts."""

from moe_sft.adapters import register_family

from .deepseek_v3 import SigmoidGroupRouterAdapter


@register_family
class Glm4MoeAdapter(SigmoidGroupRouterAdapter):
    model_types = ("glm4_moe",)
    module_path = "transformers.models.glm4_moe.modeling_glm4_moe"
    block_class_name = "Glm4MoeMoE"
    router_class_name = "Glm4MoeTopkRouter"
    experts_class_name = "Glm4MoeExperts"
