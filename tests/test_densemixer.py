"""DenseMixer: sparse forward value, dense straight-through router gradient.

The reference below evaluates every expert on every token with an explicit loop over experts
and the dense gates pi written out from DESIGN.md; the implementation uses one batched
computation. Gradients are compared in fp32 to atol 1e-5 / rtol 1e-4 (sums in another order).
"""

import pytest
import torch
import torch.nn.functional as F

import moe_sft
from moe_sft import ConfigError, MoESFTConfig, PatchError
from moe_sft.methods.densemixer import DenseMixerConfig
from moe_sft.testing import CORE_FAMILIES, tiny_batch, tiny_model

TOL = dict(atol=1e-5, rtol=1e-4)


def _cfg(memory="fast", chunk_tokens=2048):
    return MoESFTConfig(densemixer=DenseMixerConfig(memory=memory, chunk_tokens=chunk_tokens))


def _first_moe_block(model):
    handle = moe_sft.patch_model(model)
    idx = handle.layers[0].layer_idx
    handle.revert()
    return model.model.layers[idx].mlp


def _stock_block_run(block, x, r):
    """Stock block forward/backward on (x, r); returns what the reference needs."""
    seen = {}
    h1 = block.gate.register_forward_hook(lambda m, i, o: seen.__setitem__("logits", o[0] if isinstance(o, tuple) else o))
    h2 = block.experts.register_forward_pre_hook(lambda m, a: seen.__setitem__("index", a[1]))
    block.zero_grad(set_to_none=True)
    y = block(x)
    (y * r).sum().backward()
    h1.remove(), h2.remove()
    grads = {n: p.grad.clone() for n, p in block.named_parameters() if p.grad is not None}
    return y.detach(), seen["logits"].detach(), seen["index"], grads


def _reference_router_grad(block, spec, x, r, logits_index):
    """d(r . D)/d(router weight) with D = sum_e pi_e E_e(x), experts looped one by one."""
    _, index = logits_index
    xs = x.detach().reshape(-1, x.shape[-1])
    logits = block.gate(xs)
    logits = logits[0] if isinstance(logits, tuple) else logits
    p = logits.float().softmax(-1) if spec.score_func == "softmax" else logits.float().sigmoid()
    if spec.norm_topk_prob:
        S = p.gather(1, index).sum(-1, keepdim=True) + spec.norm_eps
        chosen = torch.zeros_like(p, dtype=torch.bool).scatter_(1, index, True)
        pi = torch.where(chosen, p / S, p / S.detach())
    else:
        pi = p
    pi = pi * spec.routed_scaling_factor
    W1, W2 = block.experts.gate_up_proj.detach(), block.experts.down_proj.detach()
    D = torch.zeros_like(xs)
    for e in range(W1.shape[0]):
        gate, up = F.linear(xs, W1[e]).chunk(2, dim=-1)
        out = F.linear(block.experts.act_fn(gate) * up, W2[e])
        D = D + pi[:, e : e + 1] * out
    (g,) = torch.autograd.grad((D * r.reshape(-1, r.shape[-1])).sum(), block.gate.weight)
    return g


def _check_block_gradients(model, memory):
    """One MoE block, same upstream gradient r: router gradient = the dense formula; expert and
    shared-expert gradients = the stock block's; forward value = the stock block's."""
    block = _first_moe_block(model)
    H = model.config.hidden_size
    x = torch.randn(2, 7, H)
    r = torch.randn(2, 7, H)
    y_ref, logits, index, stock_grads = _stock_block_run(block, x, r)

    handle = moe_sft.patch_model(model, _cfg(memory, chunk_tokens=5))  # 14 tokens: 3 chunks
    spec = handle.layers[0].controls.spec
    ref_router = _reference_router_grad(block, spec, x, r, (logits, index))
    block.zero_grad(set_to_none=True)
    y = block(x)
    (y * r).sum().backward()

    assert torch.equal(y.detach(), y_ref)
    torch.testing.assert_close(block.gate.weight.grad, ref_router, **TOL)
    # The dense term really changed the router gradient (unselected experts contribute).
    assert not torch.allclose(block.gate.weight.grad, stock_grads["gate.weight"], atol=1e-4)
    for name, p in block.named_parameters():
        if name.startswith("gate."):
            continue
        torch.testing.assert_close(p.grad, stock_grads[name], **TOL, msg=name)
    handle.revert()


@pytest.mark.parametrize("memory", ["fast", "recompute"])
@pytest.mark.parametrize("family", CORE_FAMILIES)
def test_block_gradients(family, memory):
    _check_block_gradients(tiny_model(family), memory)


@pytest.mark.parametrize("memory", ["fast", "recompute"])
@pytest.mark.parametrize("family", ["qwen2_moe", "mixtral"])
def test_block_gradients_wide_experts(family, memory):
    """Expert width I > hidden H: fast mode keeps the expert outputs instead of the activations."""
    key = "intermediate_size" if family == "mixtral" else "moe_intermediate_size"
    model = tiny_model(family, **{key: 96})  # hidden 64
    assert model.config.hidden_size < 96
    _check_block_gradients(model, memory)


@pytest.mark.parametrize("family", CORE_FAMILIES)
def test_forward_loss_equal_stock_and_revert(family):
    """Training forward: logits and loss bit-identical to the unpatched model; after revert the
    stock gradients come back exactly."""
    model = tiny_model(family).train()
    batch = tiny_batch(model)

    def run():
        model.zero_grad(set_to_none=True)
        out = model(**batch)
        out.loss.backward()
        return out, {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}

    ref, ref_grads = run()
    handle = moe_sft.patch_model(model, _cfg())
    out, grads = run()
    assert torch.equal(out.logits, ref.logits)
    assert torch.equal(out.loss, ref.loss)
    router = f"{handle.layers[0].name}.gate.weight"
    assert not torch.allclose(grads[router], ref_grads[router], atol=1e-5)
    handle.revert()
    _, again = run()
    for name in ref_grads:
        assert torch.equal(again[name], ref_grads[name]), name


@pytest.mark.parametrize("family", ["qwen2_moe", "deepseek_v3"])
def test_memory_modes_same_gradients(family):
    """fast and recompute give the same gradients on the whole model (several chunks)."""
    model = tiny_model(family).train()
    batch = tiny_batch(model)
    grads = {}
    for memory in ("fast", "recompute"):
        handle = moe_sft.patch_model(model, _cfg(memory, chunk_tokens=7))
        model.zero_grad(set_to_none=True)
        model(**batch).loss.backward()
        grads[memory] = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
        handle.revert()
    assert grads["fast"].keys() == grads["recompute"].keys()
    for name, g in grads["fast"].items():
        torch.testing.assert_close(grads["recompute"][name], g, atol=1e-6, rtol=1e-5, msg=name)


def test_no_dense_work_without_grad():
    """Under no_grad (evaluation, generation) the hook adds nothing: outputs equal stock."""
    model = tiny_model("qwen3_moe")
    batch = tiny_batch(model)
    with torch.no_grad():
        ref = model(**batch).logits
        handle = moe_sft.patch_model(model, _cfg("recompute"))
        out = model(**batch).logits
    assert torch.equal(out, ref)
    handle.revert()


def test_bad_config_and_longtail_condensers_are_refused():
    with pytest.raises(ConfigError, match="chunk_tokens"):
        MoESFTConfig.from_dict({"densemixer": {"chunk_tokens": 0}})
    with pytest.raises(ConfigError, match="memory"):
        MoESFTConfig.from_dict({"densemixer": {"memory": "lazy"}})
    # Always-active long-tail condensers are outside DenseMixer's top-k definition: refused by
    # patch_model before anything is installed, naming both blocks.
    model = tiny_model("olmoe").train()
    ref = model(**tiny_batch(model)).logits
    config = MoESFTConfig.from_dict(
        {"densemixer": {}, "condenser": {"bias": {"gamma": 1e-3}, "condensers": {"num": 2, "experts": {0: [0, 1], 1: [2, 3]}}}}
    )
    with pytest.raises(ConfigError, match=r"densemixer and condenser\.condensers"):
        moe_sft.patch_model(model, config)
    assert moe_sft.get_handle(model) is None and torch.equal(model(**tiny_batch(model)).logits, ref)


def test_custom_gate_split_is_refused():
    """Experts with their own _apply_gate (another gate/up split) are refused before patching."""
    model = tiny_model("qwen3_moe")
    experts = _first_moe_block(model).experts
    experts._apply_gate = lambda h: F.silu(h[..., ::2]) * h[..., 1::2]  # interleaved gate/up
    with pytest.raises(PatchError, match="_apply_gate"):
        moe_sft.patch_model(model, _cfg())
