"""ESFT: scores and selections against hand computations, slice-exact freezing under AdamW with
weight decay, trainable-parameter count, selection JSON round trip and errors."""

import json

import pytest
import torch

import moe_sft
from moe_sft import ConfigError, MoESFTConfig
from moe_sft.methods.esft import (
    ESFTConfig,
    _ScoreRecorder,
    esft_profile,
    load_selection,
    normalize_scores,
    profile_and_select,
    restore_frozen,
    save_selection,
    select_experts,
    trainable_parameters,
)
from moe_sft.routing import Routing
from moe_sft.testing import CORE_FAMILIES, tiny_batch, tiny_model


def test_scores_and_selection_by_hand():
    """A known routing log: 2 samples x 3 positions, E=4, k=2; the last position of sample 0
    is padding and must not count. Expected numbers are worked out by hand in the comments."""
    index = torch.tensor([[0, 1], [0, 2], [3, 2], [1, 3], [1, 2], [1, 0]])
    weights = torch.tensor([[0.6, 0.4], [0.5, 0.5], [0.9, 0.1], [0.7, 0.3], [0.8, 0.2], [0.6, 0.4]])
    rec = _ScoreRecorder(4)
    rec.mask = torch.tensor([[1, 1, 0], [1, 1, 1]])
    rec(Routing(None, None, index, weights, num_routed=2))
    gate = (rec.gate / rec.samples).tolist()
    token = (rec.token / rec.samples).tolist()
    # sample 0 (2 tokens): gate e0 (.6+.5)/2, e1 .4/2, e2 .5/2, e3 0; sample 1 (3 tokens):
    # e0 .4/3, e1 (.7+.8+.6)/3, e2 .2/3, e3 .3/3 -> mean over the two samples
    assert gate == pytest.approx([(0.55 + 0.4 / 3) / 2, (0.2 + 0.7) / 2, (0.25 + 0.2 / 3) / 2, 0.05])
    # token shares 1/k per pick: sample 0 e0 2/4, e1 1/4, e2 1/4; sample 1 e0 1/6, e1 3/6, e2 1/6, e3 1/6
    assert token == pytest.approx([(0.5 + 1 / 6) / 2, 0.375, (0.25 + 1 / 6) / 2, 1 / 12])

    norm = normalize_scores({5: token}, "per_layer")[5]
    assert sum(norm) == pytest.approx(1.0)
    # token: e1 .375 >= .2 -> [1]; for p=.5 e1 then e0 (.708) -> [0, 1]
    assert select_experts({5: norm}, 0.2) == {5: [1]}
    assert select_experts({5: norm}, 0.5) == {5: [0, 1]}
    # gate: e1 .45, e0 .342 (.792), e2 .158 (.95) crosses .8 and is included
    assert select_experts(normalize_scores({5: gate}), 0.8) == {5: [0, 1, 2]}
    # the official code's normalisation: per expert id over layers
    assert normalize_scores({1: [1.0, 3.0], 2: [3.0, 1.0]}, "global") == {1: [0.25, 0.75], 2: [0.75, 0.25]}
    assert normalize_scores({1: [1.0, 3.0], 2: [3.0, 1.0]}, "per_layer") == {1: [0.25, 0.75], 2: [0.75, 0.25]}
    assert normalize_scores({1: [1.0, 1.0], 2: [3.0, 1.0]}, "global") == {1: [0.25, 0.5], 2: [0.75, 0.5]}


def test_profile_matches_stock_routing_with_padding():
    """esft_profile on a padded batch == per-sample means computed here from the stock model's
    own top-k ids and weights (captured at the experts' input)."""
    model = tiny_model("qwen2_moe")
    batch = tiny_batch(model, batch=3, seq=8)
    batch["attention_mask"][0, 5:] = 0
    batch["attention_mask"][2, 2:] = 0
    seen = {}
    layers = [i for i, layer in enumerate(model.model.layers) if hasattr(layer.mlp, "experts")]
    hooks = [
        model.model.layers[i].mlp.experts.register_forward_pre_hook(lambda m, a, i=i: seen.__setitem__(i, (a[1], a[2])))
        for i in layers
    ]
    with torch.no_grad():
        model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"])
    for h in hooks:
        h.remove()
    raw = esft_profile(model, [batch], progress=False)
    assert moe_sft.get_handle(model) is None  # profiled on a temporary patch
    assert raw["samples"] == 3
    E, k = 8, 4
    for i in layers:
        idx, w = seen[i][0].view(3, 8, k), seen[i][1].view(3, 8, k)
        gate, token = torch.zeros(E, dtype=torch.float64), torch.zeros(E, dtype=torch.float64)
        for b in range(3):
            n = int(batch["attention_mask"][b].sum())
            for t in range(n):
                for j in range(k):
                    gate[idx[b, t, j]] += float(w[b, t, j]) / n / 3
                    token[idx[b, t, j]] += 1 / k / n / 3
        assert raw["gate"][i] == pytest.approx(gate.tolist(), abs=1e-6)
        assert raw["token"][i] == pytest.approx(token.tolist(), abs=1e-12)


def _selection(handle):
    """Layer 0: experts 1 and 3; later MoE layers: expert 0 (a hand-made selection)."""
    return {m.layer_idx: ([1, 3] if n == 0 else [0]) for n, m in enumerate(handle.layers)}


def _patch_esft(model, tmp_path, **flags):
    probe = moe_sft.patch_model(model)
    selection = _selection(probe)
    probe.revert()
    path = tmp_path / "sel.json"
    save_selection(path, selection)
    cfg = MoESFTConfig(esft=ESFTConfig(selection_file=str(path), **flags))
    return moe_sft.patch_model(model, cfg), selection


@pytest.mark.parametrize("family", CORE_FAMILIES)
def test_adamw_weight_decay_keeps_frozen_slices_bit_identical(family, tmp_path):
    model = tiny_model(family).train()
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    handle, selection = _patch_esft(model, tmp_path)
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=1e-2, weight_decay=0.1)
    for step in range(3):
        loss = model(**tiny_batch(model, seed=step)).loss
        loss.backward()
        for m in handle.layers:  # unselected slices get exactly zero gradient
            frozen = [e for e in range(m.controls.spec.num_experts) if e not in selection[m.layer_idx]]
            assert torch.count_nonzero(m.block.experts.gate_up_proj.grad[frozen]) == 0
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        moe_sft.step(model)  # the per-step work: ESFT restores the frozen slices
        opt.zero_grad()

    expert_names = set()
    for m in handle.layers:
        sel = selection[m.layer_idx]
        for pname in ("gate_up_proj", "down_proj"):
            name = f"{m.name}.experts.{pname}"
            expert_names.add(name)
            now = getattr(m.block.experts, pname).detach()
            frozen = [e for e in range(now.shape[0]) if e not in sel]
            assert torch.equal(now[frozen], before[name][frozen]), name
            for e in sel:
                assert not torch.equal(now[e], before[name][e]), (name, e)
    for name, p in model.named_parameters():  # router, attention, embeddings, lm_head, shared, norms
        if name not in expert_names:
            assert torch.equal(p.detach(), before[name]), name
            assert not p.requires_grad, name
    handle.revert()
    assert all(p.requires_grad for p in model.parameters())


@pytest.mark.parametrize("family", ["qwen2_moe", "deepseek_v2"])
def test_trainable_parameter_count(family, tmp_path):
    model = tiny_model(family)
    handle, selection = _patch_esft(model, tmp_path)
    H, I = model.config.hidden_size, model.config.moe_intermediate_size
    per_expert = 2 * I * H + H * I
    expected = per_expert * sum(len(v) for v in selection.values())
    assert trainable_parameters(model) == expected
    handle.revert()

    handle, _ = _patch_esft(model, tmp_path, train_shared_experts=True)
    shared = sum(p.numel() for m in handle.layers for s in handle.adapter.shared_modules(m.block) for p in s.parameters())
    assert shared > 0
    assert trainable_parameters(model) == expected + shared
    assert trainable_parameters(model) == sum(p.numel() for p in model.parameters() if p.requires_grad) - sum(
        (m.controls.spec.num_experts - len(selection[m.layer_idx])) * per_expert for m in handle.layers
    )
    handle.revert()


def test_non_expert_flag_and_plain_restore(tmp_path):
    """train_non_expert_modules: router/attention train; restore_frozen() (the plain function)
    still keeps unselected slices exact."""
    model = tiny_model("olmoe").train()
    handle, selection = _patch_esft(model, tmp_path, train_non_expert_modules=True)
    m = handle.layers[0]
    assert m.block.gate.weight.requires_grad and model.lm_head.weight.requires_grad
    w0 = m.block.experts.down_proj.detach().clone()
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2, weight_decay=0.1)
    gate0 = m.block.gate.weight.detach().clone()
    model(**tiny_batch(model)).loss.backward()
    opt.step()
    restore_frozen(model)
    frozen = [e for e in range(8) if e not in selection[m.layer_idx]]
    assert torch.equal(m.block.experts.down_proj[frozen], w0[frozen])
    assert not torch.equal(m.block.gate.weight, gate0)
    handle.revert()


def test_selection_round_trip_and_errors(tmp_path):
    model = tiny_model("qwen2_moe")  # MoE layers 0 and 2 (layer 1 is dense)
    batches = [tiny_batch(model, seed=s) for s in range(2)]
    cfg = ESFTConfig(score="gate")
    assert cfg.top_p == 0.1
    path = tmp_path / "esft.json"
    selection = profile_and_select(model, batches, cfg, path, progress=False)
    data = json.loads(path.read_text())
    assert data["score"] == "gate" and set(data["scores"]) == {"0", "2"}
    assert load_selection(path) == selection
    handle = moe_sft.patch_model(model)
    assert load_selection(path, handle) == selection

    path.write_text(json.dumps({"experts": {"1": [0]}}))
    with pytest.raises(ConfigError, match=r"layer 1 is not a sparse MoE layer.*\[0, 2\]"):
        load_selection(path, handle)
    path.write_text(json.dumps({"experts": {"2": [3, 8]}}))
    with pytest.raises(ConfigError, match=r"expert\(s\) \[8\].*0\.\.7"):
        load_selection(path, handle)
    path.write_text(json.dumps({"layers": {}}))
    with pytest.raises(ConfigError, match="not an ESFT selection"):
        load_selection(path, handle)
    handle.revert()
    with pytest.raises(ConfigError, match="selection_file is required"):
        moe_sft.patch_model(model, MoESFTConfig(esft=ESFTConfig()))
    with pytest.raises(ConfigError, match="does not exist"):
        moe_sft.patch_model(model, MoESFTConfig(esft=ESFTConfig(selection_file=str(tmp_path / "none.json"))))
    assert moe_sft.get_handle(model) is None
    with pytest.raises(ConfigError, match="top_p"):
        MoESFTConfig.from_dict({"esft": {"top_p": 1.5}})


def test_parameters_other_methods_add_keep_training(tmp_path):
    model = tiny_model("qwen3_moe").train()
    probe = moe_sft.patch_model(model)
    selection = _selection(probe)
    probe.revert()
    save_selection(tmp_path / "sel.json", selection)
    cfg = MoESFTConfig.from_dict({"moe_bias_head": {"num_experts": 4, "top_k": 2}, "esft": {"selection_file": str(tmp_path / "sel.json")}})
    handle = moe_sft.patch_model(model, cfg)
    assert all(p.requires_grad for p in model.moe_bias_head.parameters())
    assert not model.lm_head.weight.requires_grad and not model.model.embed_tokens.weight.requires_grad
    handle.revert()
