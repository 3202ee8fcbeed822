"""Stock equivalence: patched with every method off == the stock model, for every family.

Tolerance: logits and loss (aux loss included) are compared bit-for-bit (torch.equal); parameter
gradients to atol 1e-6 / rtol 1e-5 in fp32 (the patched backward sums the same terms, sometimes
in another order).
"""

from unittest import mock

import pytest
import torch
from transformers.integrations import moe as hf_moe

import moe_sft
from moe_sft.routing import route
from moe_sft.testing import ALL_FAMILIES, tiny_batch, tiny_model

GRAD_TOL = dict(atol=1e-6, rtol=1e-5)


def _run(model, batch):
    model.zero_grad(set_to_none=True)
    out = model(**batch)
    out.loss.backward()
    grads = {n: p.grad.detach().clone() for n, p in model.named_parameters() if p.grad is not None}
    return out, grads


@pytest.mark.parametrize("impl", ["eager", "grouped_mm"])
@pytest.mark.parametrize("family", ALL_FAMILIES)
def test_patched_equals_stock(family, impl):
    model = tiny_model(family, experts_implementation=impl)
    batch = tiny_batch(model)
    ref, ref_grads = _run(model, batch)

    handle = moe_sft.patch_model(model)
    assert len(handle.layers) > 0
    out, grads = _run(model, batch)

    assert torch.equal(out.logits, ref.logits)
    assert torch.equal(out.loss, ref.loss)
    if handle.adapter.has_aux_loss:
        assert ref.aux_loss is not None and torch.equal(out.aux_loss, ref.aux_loss)
        assert len(out.router_logits) == len(handle.layers)
        for a, b in zip(out.router_logits, ref.router_logits):
            assert torch.equal(a, b)
    assert grads.keys() == ref_grads.keys()
    for name in ref_grads:
        torch.testing.assert_close(grads[name], ref_grads[name], **GRAD_TOL, msg=name)

    handle.revert()
    again, again_grads = _run(model, batch)
    assert torch.equal(again.logits, ref.logits)
    for name in ref_grads:
        assert torch.equal(again_grads[name], ref_grads[name]), name


@pytest.mark.parametrize("family", ALL_FAMILIES)
def test_generic_routing_reproduces_stock_router(family):
    """`route()` with no controls returns the stock router's exact top-k ids and weights."""
    model = tiny_model(family)
    handle = moe_sft.patch_model(model)
    x = torch.randn(32, model.config.hidden_size)
    for layer in handle.layers:
        logits, stock_w, stock_idx = layer.block.gate(x)
        r = route(layer.controls.spec, logits, None, handle.adapter.selection_correction(layer.block))
        # the slot order may differ (sorted=False); compare per token as sorted pairs
        o1, o2 = stock_idx.sort(dim=-1), r.index.sort(dim=-1)
        assert torch.equal(o1.values, o2.values)
        assert torch.equal(stock_w.gather(1, o1.indices), r.weights.gather(1, o2.indices))
        assert r.weights.dtype == stock_w.dtype
    handle.revert()


@pytest.mark.parametrize("family", ["qwen2_moe", "deepseek_v3", "mixtral"])
def test_patched_forward_keeps_grouped_mm(family):
    """The experts still run through transformers' grouped_mm implementation, once per MoE
    layer per forward (routed + forced experts in one call, no extra MoE forward)."""
    model = tiny_model(family, experts_implementation="grouped_mm")
    handle = moe_sft.patch_model(model)
    calls = []
    real = hf_moe.ALL_EXPERTS_FUNCTIONS["grouped_mm"]

    def spy(self, *args, **kwargs):
        calls.append(type(self).__name__)
        return real(self, *args, **kwargs)

    with mock.patch.dict(hf_moe.ALL_EXPERTS_FUNCTIONS._global_mapping, {"grouped_mm": spy}):
        model(**tiny_batch(model))
    assert len(calls) == len(handle.layers)
    handle.revert()
