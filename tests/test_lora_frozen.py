"""frozen_router and LoRA: frozen router weights stay put; LoRA starts as the base model, trains
experts/attention adapters only, saves and reloads exactly; refused combinations say why."""

import pytest
import torch

import moe_sft
from moe_sft import ConfigError, MoESFTConfig
from moe_sft.methods.esft import ESFTConfig, save_selection
from moe_sft.methods.densemixer import DenseMixerConfig
from moe_sft.methods.frozen_router import FrozenRouterConfig
from moe_sft.methods.lora import LoraBlockConfig, get_peft_model, load_adapter, save_adapter
from moe_sft.testing import CORE_FAMILIES, tiny_batch, tiny_model


@pytest.mark.parametrize("family", CORE_FAMILIES)
def test_frozen_router_unchanged_after_steps(family):
    model = tiny_model(family).train()
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    handle = moe_sft.patch_model(model, MoESFTConfig(frozen_router=FrozenRouterConfig()))
    routers = {f"{m.name}.gate.weight" for m in handle.layers}
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2, weight_decay=0.1)
    for step in range(2):
        model(**tiny_batch(model, seed=step)).loss.backward()
        opt.step()
        opt.zero_grad()
    for name, p in model.named_parameters():
        if name in routers:
            assert torch.equal(p.detach(), before[name]) and p.grad is None, name
    moved = [n for n in ("lm_head.weight", f"{handle.layers[0].name}.experts.gate_up_proj") if not torch.equal(dict(model.named_parameters())[n], before[n])]
    assert len(moved) == 2  # everything else trains
    handle.revert()
    assert all(p.requires_grad for p in model.parameters())


def _lora_cfg(**kw):
    return MoESFTConfig(lora=LoraBlockConfig(r=4, alpha=8, **kw))


@pytest.mark.parametrize("family", CORE_FAMILIES)
def test_lora_init_equals_base_and_trains_adapters_only(family):
    model = tiny_model(family)
    batch = tiny_batch(model)
    with torch.no_grad():
        ref = model(**batch).logits
    handle = moe_sft.patch_model(model, _lora_cfg(router=family != "deepseek_v3"))
    peft_model = get_peft_model(model)
    with torch.no_grad():
        out = peft_model(**batch).logits
    assert torch.equal(out, ref)
    trainable = [n for n, p in peft_model.named_parameters() if p.requires_grad]
    assert trainable and all("lora_" in n for n in trainable)
    assert any("experts" in n for n in trainable)  # fused experts adapted
    assert any("self_attn" in n for n in trainable)  # attention adapted
    assert any(".gate.lora_" in n for n in trainable) == handle.config.lora.router  # router adapted


@pytest.mark.parametrize("family", ["qwen2_moe", "deepseek_v3"])
def test_lora_save_and_reload_exactly(family, tmp_path):
    model = tiny_model(family).train()
    batch = tiny_batch(model)
    cfg = _lora_cfg()
    cfg.routing = moe_sft.RoutingConfig(disabled_experts={moe_sft.patch_model(tiny_model(family)).layers[0].layer_idx: [2]})
    moe_sft.patch_model(model, cfg)
    peft_model = get_peft_model(model)
    opt = torch.optim.AdamW([p for p in peft_model.parameters() if p.requires_grad], lr=1e-2)
    peft_model(**batch).loss.backward()
    expert_grads = [p.grad for n, p in peft_model.named_parameters() if "experts" in n and p.grad is not None]
    assert expert_grads and any(g.abs().sum() > 0 for g in expert_grads)
    opt.step()
    peft_model.eval()
    with torch.no_grad():
        trained = peft_model(**batch).logits
    save_adapter(peft_model, tmp_path / "adapter")

    reloaded = load_adapter(tiny_model(family), tmp_path / "adapter")
    with torch.no_grad():
        again = reloaded(**batch).logits
    assert torch.equal(again, trained)
    handle = moe_sft.get_handle(reloaded.get_base_model())
    assert handle.layers[0].controls.disabled[2]  # the patch's own tensors came back too
    with pytest.raises(FileExistsError):
        save_adapter(peft_model, tmp_path / "adapter")


def test_refused_combinations(tmp_path):
    model = tiny_model("olmoe")
    save_selection(tmp_path / "sel.json", {0: [1]})
    with pytest.raises(ConfigError, match="lora and esft"):
        moe_sft.patch_model(model, MoESFTConfig(lora=LoraBlockConfig(), esft=ESFTConfig(selection_file=str(tmp_path / "sel.json"))))
    assert all(p.requires_grad for p in model.parameters())  # the ESFT freeze was rolled back
    with pytest.raises(ConfigError, match="lora and densemixer"):
        moe_sft.patch_model(model, MoESFTConfig(lora=LoraBlockConfig(), densemixer=DenseMixerConfig()))
    with pytest.raises(ConfigError, match="frozen_router"):
        moe_sft.patch_model(model, MoESFTConfig(lora=LoraBlockConfig(router=True), frozen_router=FrozenRouterConfig()))
    assert moe_sft.get_handle(model) is None
    with pytest.raises(ConfigError, match="dropout"):
        MoESFTConfig.from_dict({"lora": {"dropout": 0.1}})
    with pytest.raises(ValueError, match="lora:"):
        get_peft_model(model)
    with pytest.raises(ConfigError, match="e_score_correction_bias"):
        moe_sft.patch_model(tiny_model("deepseek_v3"), MoESFTConfig(lora=LoraBlockConfig(router=True)))
