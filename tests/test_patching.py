"""Patching mechanics: revert, refusal to patch twice, clear errors, and the extension points
of the generic forward (tested with no method on)."""

import pytest
import torch
import transformers
from torch import nn
from transformers import AutoConfig, AutoModelForCausalLM

import moe_sft
from moe_sft.config import ConfigError, MoESFTConfig, RoutingConfig
from moe_sft.routing import route
from moe_sft.testing import ALL_FAMILIES, CORE_FAMILIES, tiny_batch, tiny_config, tiny_model


def _state(model):
    return {k: v.clone() for k, v in model.state_dict().items()}


@pytest.mark.parametrize("family", CORE_FAMILIES)
def test_revert_restores_stock_classes_and_state(family):
    model = tiny_model(family)
    classes = {n: type(m) for n, m in model.named_modules()}
    before = _state(model)
    handle = moe_sft.patch_model(model, MoESFTConfig(track_usage=True))
    assert moe_sft.get_handle(model) is handle
    patched = [n for n, m in model.named_modules() if type(m) is not classes.get(n)]
    assert patched, "patching swapped no block class"
    handle.revert()
    assert {n: type(m) for n, m in model.named_modules()} == classes
    after = model.state_dict()
    assert after.keys() == before.keys()
    assert all(torch.equal(after[k], before[k]) for k in before)
    assert moe_sft.get_handle(model) is None
    with pytest.raises(moe_sft.PatchError, match="already reverted"):
        handle.revert()
    moe_sft.patch_model(model).revert()  # patchable again after revert


def test_patching_twice_raises():
    model = tiny_model("qwen3_moe")
    handle = moe_sft.patch_model(model)
    with pytest.raises(moe_sft.PatchError, match="already patched.*revert"):
        moe_sft.patch_model(model)
    handle.revert()


def test_unsupported_model_type_names_class_families_and_version():
    cfg = AutoConfig.for_model(
        "llama", vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
        num_attention_heads=4, num_key_value_heads=2,
    )
    model = AutoModelForCausalLM.from_config(cfg)
    with pytest.raises(moe_sft.PatchError) as err:
        moe_sft.patch_model(model)
    msg = str(err.value)
    for piece in ("LlamaForCausalLM", "'llama'", "qwen3_moe", "deepseek_v2", "mixtral", transformers.__version__):
        assert piece in msg


@pytest.mark.parametrize(
    "breakage, piece",
    [
        (lambda mlp: setattr(mlp, "experts", nn.Linear(4, 4)), "`.experts` is a Linear"),
        (lambda mlp: delattr(mlp, "gate"), "no router at `.gate`"),
        (lambda mlp: setattr(mlp.experts, "gate_up_proj", nn.Parameter(torch.zeros(4, 4))), "gate_up_proj"),
    ],
)
def test_unexpected_layout_is_a_clear_error(breakage, piece):
    model = tiny_model("olmoe")
    breakage(model.model.layers[1].mlp)
    with pytest.raises(moe_sft.PatchError) as err:
        moe_sft.patch_model(model)
    msg = str(err.value)
    assert "layers[1].mlp (OlmoeSparseMoeBlock)" in msg and piece in msg
    assert transformers.__version__ in msg and "olmoe" in msg
    assert moe_sft.get_handle(model) is None  # nothing left half-patched
    assert type(model.model.layers[0].mlp).__name__ == "OlmoeSparseMoeBlock"


def test_dense_layers_are_left_alone():
    model = tiny_model("deepseek_v2")  # first_k_dense_replace=1
    handle = moe_sft.patch_model(model)
    assert [m.layer_idx for m in handle.layers] == [1, 2]
    assert not hasattr(model.model.layers[0].mlp, "moe_sft")
    handle.revert()
    model = tiny_model("qwen2_moe")  # mlp_only_layers=[1]
    handle = moe_sft.patch_model(model)
    assert [m.layer_idx for m in handle.layers] == [0, 2]
    handle.revert()


# ---- extension points ---------------------------------------------------------------------


@pytest.mark.parametrize("family", CORE_FAMILIES)
def test_disabled_experts_are_never_selected_and_renormalise(family):
    model = tiny_model(family)
    layer_idx = model.config.num_hidden_layers - 1
    off = [0, 3]
    handle = moe_sft.patch_model(
        model, MoESFTConfig(routing=RoutingConfig(disabled_experts={layer_idx: off}), track_usage=True)
    )
    model.train()
    model(**tiny_batch(model, batch=4, seq=16))
    usage = handle.usage()
    assert usage[layer_idx].counts[off].sum() == 0
    assert usage[layer_idx].tokens == 64
    # scores of the survivors are the family's scores over the surviving logits
    layer = next(m for m in handle.layers if m.layer_idx == layer_idx)
    x = torch.randn(8, model.config.hidden_size)
    logits = layer.block.gate(x)[0]
    r = route(layer.controls.spec, logits, layer.controls, handle.adapter.selection_correction(layer.block))
    keep = torch.ones(logits.shape[-1], dtype=torch.bool)
    keep[off] = False
    if layer.controls.spec.score_func == "softmax":
        expected = torch.softmax(logits.float()[:, keep], dim=-1)
        torch.testing.assert_close(r.scores[:, keep], expected, atol=1e-7, rtol=1e-6)
        assert torch.all(r.scores[:, ~keep] == 0)
    assert not torch.isin(r.index, torch.tensor(off)).any()
    handle.revert()


def test_disabled_experts_config_errors():
    model = tiny_model("qwen3_moe")
    with pytest.raises(ConfigError, match="layer 7"):
        moe_sft.patch_model(model, MoESFTConfig(routing=RoutingConfig(disabled_experts={7: [0]})))
    with pytest.raises(ConfigError, match=r"\[9\] out of range 0..7"):
        moe_sft.patch_model(model, MoESFTConfig(routing=RoutingConfig(disabled_experts={0: [9]})))
    with pytest.raises(ConfigError, match="fewer than top_k=4"):
        moe_sft.patch_model(model, MoESFTConfig(routing=RoutingConfig(disabled_experts={0: [0, 1, 2, 3, 4]})))
    assert moe_sft.get_handle(model) is None
    assert type(model.model.layers[0].mlp).__name__ == "Qwen3MoeSparseMoeBlock"


@pytest.mark.parametrize("family", ["qwen2_moe", "deepseek_v3", "mixtral"])
def test_zero_biases_are_a_no_op(family):
    model = tiny_model(family)
    batch = tiny_batch(model)
    ref = model(**batch).logits
    handle = moe_sft.patch_model(model)
    for m in handle.layers:
        E = m.controls.spec.num_experts
        m.controls.set_tensor("logit_bias", torch.zeros(E))
        m.controls.set_tensor("selection_bias", torch.zeros(E))
    assert torch.equal(model(**batch).logits, ref)
    handle.revert()


def test_logit_and_selection_bias_follow_their_placement():
    model = tiny_model("qwen3_moe")
    handle = moe_sft.patch_model(model)
    ctl = handle.layers[0].controls
    gate = handle.layers[0].block.gate
    x = torch.randn(16, model.config.hidden_size)
    z = gate(x)[0]
    b = torch.linspace(-1, 1, 8)
    ctl.set_tensor("logit_bias", b)
    r = route(ctl.spec, z, ctl)
    p = torch.softmax(z + b, dim=-1)
    top = p.topk(4, dim=-1)
    assert torch.equal(r.index, top.indices)
    torch.testing.assert_close(r.weights, top.values / top.values.sum(-1, keepdim=True))
    ctl.set_tensor("logit_bias", None)
    ctl.set_tensor("selection_bias", b * 10)  # selection only: gates from the unbiased p
    r = route(ctl.spec, z, ctl)
    s = torch.softmax(z, dim=-1)
    idx = (s + b * 10).topk(4, dim=-1).indices
    assert torch.equal(r.index, idx)
    w = s.gather(1, idx)
    torch.testing.assert_close(r.weights, w / w.sum(-1, keepdim=True))
    handle.revert()


def test_forced_experts_are_in_every_token_and_not_routed_twice():
    model = tiny_model("qwen3_moe")
    handle = moe_sft.patch_model(model)
    ctl = handle.layers[0].controls
    x = torch.randn(64, model.config.hidden_size)
    z = handle.layers[0].block.gate(x)[0]
    ctl.set_tensor("forced", torch.tensor([5, 6]))
    ctl.num_routed = 2
    r = route(ctl.spec, z, ctl)
    assert r.index.shape == (64, 4) and r.num_routed == 2
    assert torch.all(r.index[:, 2:] == torch.tensor([5, 6]))
    assert not torch.isin(r.index[:, :2], torch.tensor([5, 6])).any()
    torch.testing.assert_close(r.weights.sum(-1), torch.ones(64))  # norm_topk_prob over all 4
    model(**tiny_batch(model))  # runs end to end through the fused experts
    handle.revert()


def test_output_hooks_see_routing_and_replace_the_output():
    model = tiny_model("olmoe")
    batch = tiny_batch(model)
    ref = model(**batch).logits
    handle = moe_sft.patch_model(model)
    seen = []

    def hook(block, x, routing, y):
        seen.append((x.shape, routing.index.shape, y.shape))
        return y * 0.0

    for m in handle.layers:
        m.controls.output_hooks.append(hook)
    out = model(**batch).logits
    assert len(seen) == len(handle.layers)
    T = batch["input_ids"].numel()
    assert seen[0] == ((T, 64), (T, 4), (T, 64))
    assert not torch.allclose(out, ref)  # the hook's output is what the layer returns
    handle.revert()


def test_usage_counts_only_real_training_forwards():
    model = tiny_model("qwen3_moe")
    handle = moe_sft.patch_model(model, MoESFTConfig(track_usage=True))
    batch = tiny_batch(model, batch=2, seq=8)  # 16 tokens
    model.eval()
    model(**batch)
    model.train()
    with torch.no_grad():
        model(**batch)
    assert all(s.tokens == 0 and s.counts.sum() == 0 for s in handle.usage().values())

    model(**batch).loss.backward()
    for s in handle.usage().values():
        assert s.tokens == 16 and s.counts.sum() == 16 * 4 and s.counts.dtype == torch.int64
        torch.testing.assert_close(s.score_mass.sum(), torch.tensor(16.0))  # softmax rows sum to 1

    # gradient checkpointing: the recompute in backward must not count again. Early stop is
    # off so the recompute runs the whole block (torch's default may stop before the end).
    handle.usage(reset=True)
    model.activation_checkpointing_enable()
    with torch.utils.checkpoint.set_checkpoint_early_stop(False):
        model(**batch).loss.backward()
    assert all(s.tokens == 16 and s.counts.sum() == 64 for s in handle.usage().values())
    handle.revert()


@pytest.mark.parametrize("family", CORE_FAMILIES)
def test_routing_replay_reproduces_recorded_picks_and_keeps_the_router_gradient(family):
    """Replaying the picks a forward made gives that forward's outputs exactly; replaying other
    picks routes there (gate weights from the current scores, so the router still gets a
    gradient); a replay of the wrong shape is refused."""
    model = tiny_model(family)
    handle = moe_sft.patch_model(model)
    batch = tiny_batch(model)
    recorded = {}
    with handle.observing(lambda i, routing, x, block: recorded.__setitem__(i, routing.index[:, : routing.num_routed].clone())):
        ref = model(**batch).logits
    for m in handle.layers:
        m.controls.replay = recorded[m.layer_idx]
    assert torch.equal(model(**batch).logits, ref)

    seen = {}
    with handle.observing(lambda i, routing, x, block: seen.__setitem__(i, routing.index.clone())):
        for m in handle.layers:  # every token: the k experts with the highest ids
            E, k = m.controls.spec.num_experts, recorded[m.layer_idx].shape[1]
            m.controls.replay = torch.arange(E - k, E).expand_as(recorded[m.layer_idx]).clone()
        model.train()
        out = model(**batch)
        out.loss.backward()
    for m in handle.layers:
        assert torch.equal(seen[m.layer_idx], m.controls.replay)
        assert m.block.gate.weight.grad is not None and m.block.gate.weight.grad.abs().sum() > 0
    assert not torch.equal(out.logits, ref)
    handle.layers[0].controls.replay = recorded[handle.layers[0].layer_idx][:3]
    with pytest.raises(ValueError, match="routing replay holds"):
        model(**batch)
    handle.revert()


def _meta_blocks(method: str, layers: list[int], selection: str) -> dict:
    first = lambda n: {i: list(range(n)) for i in layers}  # noqa: E731
    return {
        "condenser_longtail": {"condenser": {"bias": {"gamma": 0.01}, "condensers": {"num": 1, "experts": first(1)}}},
        "condenser_new": {"condenser": {"bias": {"gamma": 0.01}, "condensers": {"source": "new", "experts": first(3)}}},
        "densemixer": {"densemixer": {}},
        "esft": {"esft": {"selection_file": selection}},
        "frozen_router": {"frozen_router": {}},
        "moe_bias_head": {"moe_bias_head": {}},
        "lora": {"lora": {}},
        "disabled_experts": {"routing": {"disabled_experts": first(1)}},
    }[method]


META_METHODS = ("condenser_longtail", "condenser_new", "densemixer", "esft", "frozen_router", "moe_bias_head", "lora", "disabled_experts")


@pytest.mark.parametrize("method", META_METHODS)
@pytest.mark.parametrize("family", ALL_FAMILIES)
def test_every_method_patches_a_meta_device_model(family, method, tmp_path):
    """Large checkpoints are planned on the meta device (`moe-sft train --dry-run`): every
    method patches such a model (added tensors on meta too) and reverts it."""
    from moe_sft.methods.esft import save_selection

    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(tiny_config(family))
    probe = moe_sft.patch_model(model)
    layers = [m.layer_idx for m in probe.layers]
    probe.revert()
    save_selection(tmp_path / "sel.json", {i: [0, 1] for i in layers})
    handle = moe_sft.patch_model(model, MoESFTConfig.from_dict(_meta_blocks(method, layers, str(tmp_path / "sel.json"))))
    assert handle.extra_keys() or method in ("densemixer", "esft", "frozen_router", "lora")
    assert all(t.is_meta for t in handle.extra_state_dict().values())
    handle.revert()
    assert moe_sft.get_handle(model) is None
