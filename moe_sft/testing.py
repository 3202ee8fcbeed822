"""Tiny random models of every supported family, for tests, examples and the demo.

All tiny shapes live in `TINY_CONFIGS`, keyed by `model_type`. Every tiny model routes
top-4 of 8 (or 16) experts, so methods that need k > r (condensers) work on all of them.
"""

from __future__ import annotations

import torch
from transformers import AutoConfig, AutoModelForCausalLM, PretrainedConfig, PreTrainedModel

# Shared by every family: small enough for a CPU test, big enough to have real routing.
_COMMON = dict(
    vocab_size=128,
    hidden_size=64,
    intermediate_size=96,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=256,
    num_experts_per_tok=4,
    tie_word_embeddings=False,
    initializer_range=0.1,  # larger than the real 0.02 so routing is not near-uniform
    pad_token_id=0,
    bos_token_id=1,
    eos_token_id=2,
)

_MLA = dict(  # DeepSeek multi-head latent attention, scaled down
    num_key_value_heads=4,  # MLA has one KV head per query head, as in the real configs
    kv_lora_rank=16,
    q_lora_rank=None,
    qk_nope_head_dim=8,
    qk_rope_head_dim=8,
    v_head_dim=16,
    head_dim=8,
)

TINY_CONFIGS: dict[str, dict] = {
    "qwen2_moe": dict(
        num_hidden_layers=3,
        num_experts=8,
        moe_intermediate_size=32,
        shared_expert_intermediate_size=48,
        norm_topk_prob=False,
        mlp_only_layers=[1],  # one dense layer, as some Qwen-MoE checkpoints have
        output_router_logits=True,
    ),
    "qwen3_moe": dict(
        num_hidden_layers=2,
        num_experts=8,
        moe_intermediate_size=32,
        norm_topk_prob=True,
        head_dim=16,
        output_router_logits=True,
    ),
    "deepseek_v2": dict(
        num_hidden_layers=3,
        first_k_dense_replace=1,
        n_routed_experts=16,
        n_shared_experts=1,
        moe_intermediate_size=32,
        topk_method="group_limited_greedy",
        n_group=4,
        topk_group=2,
        routed_scaling_factor=1.5,
        **_MLA,
    ),
    "deepseek_v3": dict(
        num_hidden_layers=3,
        first_k_dense_replace=1,
        n_routed_experts=16,
        n_shared_experts=1,
        moe_intermediate_size=32,
        n_group=4,
        topk_group=2,
        norm_topk_prob=True,
        routed_scaling_factor=2.5,
        **_MLA,
    ),
    "olmoe": dict(
        num_hidden_layers=2,
        num_experts=8,
        intermediate_size=32,
        norm_topk_prob=False,
        output_router_logits=True,
    ),
    "mixtral": dict(
        num_hidden_layers=2,
        num_local_experts=8,
        intermediate_size=32,
        head_dim=16,
        output_router_logits=True,
    ),
    "glm4_moe": dict(
        num_hidden_layers=3,
        first_k_dense_replace=1,
        n_routed_experts=16,
        n_shared_experts=1,
        moe_intermediate_size=32,
        n_group=4,
        topk_group=2,
        norm_topk_prob=True,
        routed_scaling_factor=1.5,
        head_dim=16,
    ),
    "qwen3_next": dict(
        num_hidden_layers=2,
        layer_types=["linear_attention", "full_attention"],
        num_experts=8,
        moe_intermediate_size=32,
        shared_expert_intermediate_size=48,
        norm_topk_prob=True,
        head_dim=16,
        linear_key_head_dim=16,
        linear_value_head_dim=16,
        linear_num_key_heads=2,
        linear_num_value_heads=4,
        output_router_logits=True,
    ),
}

# The six families every test runs on; the two extra families reuse the same adapters.
CORE_FAMILIES = ("qwen2_moe", "qwen3_moe", "deepseek_v2", "deepseek_v3", "olmoe", "mixtral")
ALL_FAMILIES = tuple(TINY_CONFIGS)


def tiny_config(model_type: str, **overrides) -> PretrainedConfig:
    """A tiny `PretrainedConfig` of `model_type`; `overrides` replace any field."""
    if model_type not in TINY_CONFIGS:
        raise ValueError(
            f"no tiny config for model_type {model_type!r}; known: {', '.join(sorted(TINY_CONFIGS))}"
        )
    fields = {**_COMMON, **TINY_CONFIGS[model_type], **overrides}
    return AutoConfig.for_model(model_type, **fields)


def tiny_model(
    model_type: str,
    *,
    seed: int = 0,
    experts_implementation: str | None = None,
    dtype: torch.dtype = torch.float32,
    **overrides,
) -> PreTrainedModel:
    """A randomly initialised tiny causal LM of `model_type` (eval mode, fp32 by default).

    `experts_implementation` is transformers' choice for the fused experts ("eager",
    "grouped_mm", "batched_mm"); None keeps transformers' default (grouped_mm).
    """
    config = tiny_config(model_type, **overrides)
    kwargs = {"dtype": dtype}
    if experts_implementation is not None:
        kwargs["experts_implementation"] = experts_implementation
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config, **kwargs)
    return model.eval()


def tiny_batch(model: PreTrainedModel, *, batch: int = 2, seq: int = 12, seed: int = 0) -> dict:
    """Random token ids with labels (= input ids) for `model`'s vocabulary."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, model.config.vocab_size, (batch, seq), generator=g)
    return {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids.clone()}


# Character-level chat template for the tiny tokenizer: each turn is "<s>role: content</s>\n".
TINY_CHAT_TEMPLATE = (
    "{% for m in messages %}<s>{{ m['role'] }}: {{ m['content'] }}</s>\n{% endfor %}"
    "{% if add_generation_prompt %}<s>assistant: {% endif %}"
)


def tiny_tokenizer(chars: str | None = None, chat_template: str = TINY_CHAT_TEMPLATE):
    """An offline character-level tokenizer whose ids fit every tiny model's vocabulary (128):
    <pad>=0, <s>=1, </s>=2 (the tiny configs' pad/bos/eos), <unk>=3, then printable ASCII
    (or only `chars`, in that order, for a smaller vocabulary such as the demo's).
    It has a chat template and gives character offsets, like the fast tokenizers of real models."""
    import string

    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    specials = ["<pad>", "<s>", "</s>", "<unk>"]
    if chars is None:
        chars = [c for c in string.printable if c not in "\x0b\x0c\r"]
    elif len(set(chars)) != len(chars):
        raise ValueError(f"tiny_tokenizer(chars={chars!r}): characters must be unique")
    vocab = {tok: i for i, tok in enumerate(specials + list(chars))}
    backend = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.Split("", behavior="isolated")  # one token per character
    backend.decoder = decoders.Fuse()
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=backend, pad_token="<pad>", bos_token="<s>", eos_token="</s>", unk_token="<unk>"
    )
    tokenizer.chat_template = chat_template
    return tokenizer
