"""Mixtral: softmax (in fp32) router, top-k always renormalised, gate weights kept in fp32,
optional multiplicative input jitter during training."""

import torch

from moe_sft.adapters import FamilyAdapter, RouterSpec, register_family


@register_family
class MixtralAdapter(FamilyAdapter):
    model_types = ("mixtral",)
    module_path = "transformers.models.mixtral.modeling_mixtral"
    block_class_name = "MixtralSparseMoeBlock"
    router_class_name = "MixtralTopKRouter"
    experts_class_name = "MixtralExperts"
    expert_count_field = "num_local_experts"
    has_aux_loss = True

    def router_spec(self, config) -> RouterSpec:
        return RouterSpec(
            num_experts=config.num_local_experts,
            top_k=config.num_experts_per_tok,
            score_func="softmax",
            norm_topk_prob=True,
            weights_fp32=True,
        )

    def prepare_input(self, block, x):
        # Same in-place jitter as the stock block: scales routing and expert inputs alike.
        if block.training and block.jitter_noise > 0:
            x *= torch.empty_like(x).uniform_(1.0 - block.jitter_noise, 1.0 + block.jitter_noise)
        return x
