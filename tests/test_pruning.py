"""Expert pruning: profiling statistics against independent recomputations, mask mode against
the family's own router on the surviving experts, remove-mode exports loaded with stock
transformers against the mask model, strategies on hand-made profiles, the CLI verbs."""

from __future__ import annotations

import copy
import json

import pytest
import torch
from transformers import AutoModelForCausalLM

import moe_sft
from moe_sft.adapters import get_adapter
from moe_sft.cli import main
from moe_sft.config import ConfigError, MoESFTConfig, RoutingConfig
from moe_sft.pruning import (
    ExpertProfile,
    apply_mask,
    check_removable,
    export_removed,
    masked,
    profile_model,
    select_experts,
)
from moe_sft.pruning.profile import CUMULATIVE_PNG, HEATMAP_PNG, PROFILE_JSON
from moe_sft.testing import ALL_FAMILIES, CORE_FAMILIES, tiny_batch, tiny_model, tiny_tokenizer

TEXTS = [
    "What is 6 + 6? 6 + 6 = 12.",
    "A short one.",
    "The quick brown fox jumps over the lazy dog, again and again, until the dog wakes up.",
    "x",
    "Below is an instruction that describes a task.",
]


def padding_safe_model(family: str):
    # As many KV heads as heads: the tiny DeepSeek configs' 2 KV heads (of 4) break transformers'
    # MLA attention under a padding mask; real DeepSeek checkpoints have equal counts.
    return tiny_model(family, num_key_value_heads=4)


def moe_layers(model) -> list[int]:
    return get_adapter(model).moe_layer_indices(model)


def balanced_selection(model) -> dict[int, list[int]]:
    """Two (8 experts) or four (16 experts: one per group of 4) experts per MoE layer, different per layer."""
    E = get_adapter(model).router_spec(model.config).num_experts
    picks = ([1, 6], [0, 3]) if E == 8 else ([1, 6, 8, 15], [0, 5, 10, 12])
    return {layer: picks[i % 2] for i, layer in enumerate(moe_layers(model))}


def capture_routing(model) -> dict:
    """Output hooks recording each patched layer's (x, routing) into the returned dict."""
    records = {}
    handle = moe_sft.get_handle(model)

    def hook(block, x, routing, y):
        records[block.moe_sft.layer_idx] = (x.detach().clone(), routing)
        return y

    for m in handle.layers:
        m.controls.output_hooks.append(hook)
    return records


# ---- profiling ------------------------------------------------------------------------------
def test_profile_matches_direct_recomputation_on_stock_router():
    """counts, gate mass and max |expert output| of qwen3_moe recomputed from the stock model's own
    router logits and the fused expert weights, one token and expert at a time."""
    model, tok = tiny_model("qwen3_moe", experts_implementation="eager"), tiny_tokenizer()
    prof = profile_model(model, tok, TEXTS, batch_size=2)
    assert moe_sft.get_handle(model) is None  # the temporary patch is reverted

    inputs = {}
    hooks = [layer.mlp.register_forward_hook(lambda mod, a, out, i=i: inputs.__setitem__(i, a[0].reshape(-1, a[0].shape[-1])))
             for i, layer in enumerate(model.model.layers)]  # fmt: skip
    k, E = model.config.num_experts_per_tok, model.config.num_experts
    counts, mass, peak = torch.zeros(2, E, dtype=torch.int64), torch.zeros(2, E), torch.zeros(2, E)
    tokens = 0
    with torch.no_grad():
        for text in TEXTS:  # unpadded, one text at a time
            ids = tok(text, return_tensors="pt")["input_ids"]
            tokens += ids.shape[1]
            out = model(input_ids=ids, output_router_logits=True)
            for i, logits in enumerate(out.router_logits):
                p = logits.float().softmax(-1)
                top, idx = p.topk(k, dim=-1)
                top = top / top.sum(-1, keepdim=True)  # norm_topk_prob=True
                experts = model.model.layers[i].mlp.experts
                for e in range(E):
                    tok_pos, slot = (idx == e).nonzero(as_tuple=True)
                    if not len(tok_pos):
                        continue
                    x = inputs[i][tok_pos]  # (n, H) tokens routed to e
                    gate, up = (x @ experts.gate_up_proj[e].T).chunk(2, dim=-1)
                    y = (experts.act_fn(gate) * up) @ experts.down_proj[e].T  # (n, H), before gate weighting
                    counts[i, e] += len(tok_pos)
                    mass[i, e] += top[tok_pos, slot].sum()
                    peak[i, e] = max(peak[i, e], y.abs().max())
    for h in hooks:
        h.remove()
    assert prof.tokens == tokens and prof.layers == [0, 1]
    assert torch.equal(prof.counts, counts)
    torch.testing.assert_close(prof.gate_mass, mass, atol=1e-4, rtol=1e-5)
    torch.testing.assert_close(prof.max_abs_output, peak, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("family", CORE_FAMILIES)
def test_profile_excludes_padding(family):
    """Batches of unequal texts (padded) give the same statistics as one unpadded text at a time."""
    model, tok = padding_safe_model(family), tiny_tokenizer()
    batched = profile_model(model, tok, TEXTS, batch_size=5)
    single = profile_model(model, tok, TEXTS, batch_size=1)
    assert batched.tokens == single.tokens == sum(len(t) for t in TEXTS)  # one token per character
    assert torch.equal(batched.counts, single.counts)
    assert (batched.counts.sum(1) == batched.tokens * model.config.num_experts_per_tok).all()
    torch.testing.assert_close(batched.gate_mass, single.gate_mass, atol=1e-4, rtol=1e-5)
    torch.testing.assert_close(batched.max_abs_output, single.max_abs_output, atol=1e-5, rtol=1e-5)


# ---- mask mode -----------------------------------------------------------------------------
def small_router(model, block, keep: list[int]):
    """The family's stock router class built for len(keep) experts, holding the kept rows."""
    adapter = get_adapter(model)
    config = copy.deepcopy(model.config)
    setattr(config, adapter.expert_count_field, len(keep))
    router = adapter.router_class(config)
    with torch.no_grad():
        router.weight.copy_(block.gate.weight[keep])
        if hasattr(router, "e_score_correction_bias"):
            router.e_score_correction_bias.copy_(block.gate.e_score_correction_bias[keep])
    return router


@pytest.mark.parametrize("family", CORE_FAMILIES)
def test_masked_experts_get_no_tokens_and_weights_renormalise_as_the_family(family):
    model, tok = padding_safe_model(family), tiny_tokenizer()
    selection = balanced_selection(model)
    handle = apply_mask(model, selection)
    assert handle.config.routing.disabled_experts == selection

    prof = profile_model(model, tok, TEXTS, batch_size=2)
    assert moe_sft.get_handle(model) is handle  # an already patched model stays patched
    for layer, ids in selection.items():
        row = prof.counts[prof.row(layer)]
        assert (row[ids] == 0).all() and (prof.gate_mass[prof.row(layer)][ids] == 0).all()
        assert row.sum() == prof.tokens * model.config.num_experts_per_tok

    # Gate weights: the family's stock router run on the surviving experts only.
    records = capture_routing(model)
    with torch.no_grad():
        model(**{k: v for k, v in tiny_batch(model).items() if k != "labels"})
    E = handle.layers[0].controls.spec.num_experts
    for layer, ids in selection.items():
        x, routing = records[layer]
        keep = [e for e in range(E) if e not in ids]
        block = model.model.layers[layer].mlp
        _, ref_w, ref_idx = small_router(model, block, keep)(x)
        got_idx = routing.index.sort(dim=1)
        want = torch.tensor(keep)[ref_idx].sort(dim=1)  # back to the original expert ids
        assert torch.equal(got_idx.values, want.values)
        torch.testing.assert_close(routing.weights.gather(1, got_idx.indices), ref_w.gather(1, want.indices).to(routing.weights.dtype),
                                   atol=1e-6, rtol=1e-5)  # fmt: skip


def test_masked_context_restores_the_model():
    model = tiny_model("qwen3_moe")
    batch = {k: v for k, v in tiny_batch(model).items() if k != "labels"}
    with torch.no_grad():
        stock = model(**batch).logits
        with masked(model, {0: [2, 3]}):
            pruned = model(**batch).logits
        assert moe_sft.get_handle(model) is None  # it patched, so it reverted
        assert torch.equal(model(**batch).logits, stock) and not torch.equal(pruned, stock)

        handle = moe_sft.patch_model(model, MoESFTConfig(routing=RoutingConfig(disabled_experts={1: [5]})))
        before = model(**batch).logits
        config = handle.config
        with masked(model, {0: [2, 3]}) as h:
            assert h.config.routing.disabled_experts == {0: [2, 3], 1: [5]}  # union with the model's own mask
        assert handle.config is config and handle.layers[0].controls.disabled is None
        assert "disabled" not in dict(handle.layers[0].controls.named_buffers())
        assert torch.equal(model(**batch).logits, before)
    handle.revert()


def test_mask_refuses_bad_selections():
    model = tiny_model("olmoe")
    with pytest.raises(ConfigError, match="fewer than top_k=4"):
        apply_mask(model, {0: [0, 1, 2, 3, 4]})
    with pytest.raises(ConfigError, match="out of range"):
        apply_mask(model, {0: [8]})
    with pytest.raises(ConfigError, match="not a sparse MoE layer"):
        apply_mask(model, {5: [1]})
    assert moe_sft.get_handle(model) is None  # refused before patching


# ---- remove mode ---------------------------------------------------------------------------
@pytest.mark.parametrize("family", ALL_FAMILIES)
def test_remove_export_loads_with_stock_transformers_and_equals_mask(family, tmp_path):
    model = tiny_model(family)
    adapter = get_adapter(model)
    E = adapter.router_spec(model.config).num_experts
    selection = balanced_selection(model)
    n = len(next(iter(selection.values())))
    batch = {k: v for k, v in tiny_batch(model).items() if k != "labels"}
    apply_mask(model, selection)
    records = capture_routing(model)
    with torch.no_grad():
        ref = model(**batch).logits
    mask_index = {layer: routing.index for layer, (_, routing) in records.items()}

    export_removed(model, selection, tmp_path / "removed", metadata={"strategy": "hand-made"})
    files = {p.name for p in (tmp_path / "removed").iterdir()}
    assert "moe_sft_config.json" not in files and "moe_sft_tensors.safetensors" not in files
    assert json.loads((tmp_path / "removed" / "pruning.json").read_text())["pruned"] == {str(k): v for k, v in selection.items()}

    small = AutoModelForCausalLM.from_pretrained(tmp_path / "removed").eval()  # stock transformers only
    assert getattr(small.config, adapter.expert_count_field) == E - n
    for layer in moe_layers(small):
        block = small.model.layers[layer].mlp
        assert block.gate.weight.shape[0] == E - n
        assert block.experts.gate_up_proj.shape[0] == block.experts.down_proj.shape[0] == E - n
        if hasattr(block.gate, "e_score_correction_bias"):
            assert block.gate.e_score_correction_bias.shape == (E - n,)
    with torch.no_grad():
        got = small(**batch).logits
    # Not bit-exact: the router GEMM over fewer rows and the softmax over fewer terms round differently.
    torch.testing.assert_close(got, ref, atol=1e-5, rtol=1e-5)

    # Same experts chosen for every token (the small model's ids mapped back to the original ones).
    moe_sft.patch_model(small)  # every method off: the stock forward, to read its routing
    small_records = capture_routing(small)
    with torch.no_grad():
        small(**batch)
    for layer, ids in selection.items():
        keep = torch.tensor([e for e in range(E) if e not in ids])
        assert torch.equal(keep[small_records[layer][1].index].sort(1).values, mask_index[layer].sort(1).values)


def test_remove_refusals(tmp_path):
    out = tmp_path / "never"
    qwen = tiny_model("qwen3_moe")
    with pytest.raises(ConfigError, match=r"same number of experts pruned in every MoE layer.*\{0: 2, 1: 1\}"):
        export_removed(qwen, {0: [1, 2], 1: [3]}, out)
    with pytest.raises(ConfigError, match="fewer than top_k=4"):
        export_removed(qwen, {0: [0, 1, 2, 3, 4], 1: [0, 1, 2, 3, 4]}, out)
    ds = tiny_model("deepseek_v3")
    with pytest.raises(ConfigError, match=r"layer 1: .*same number in every group.*\[2, 0, 0, 0\]"):
        check_removable(ds, {1: [0, 1], 2: [0, 4]})
    with pytest.raises(ConfigError, match="leave 1 expert"):
        check_removable(ds, {layer: [0, 1, 2, 4, 5, 6, 8, 9, 10, 12, 13, 14][:12] for layer in (1, 2)})
    from moe_sft.methods.frozen_router import FrozenRouterConfig

    frozen = tiny_model("olmoe")
    moe_sft.patch_model(frozen, MoESFTConfig(frozen_router=FrozenRouterConfig()))
    with pytest.raises(ConfigError, match="patched with frozen_router"):
        export_removed(frozen, {0: [1], 1: [1]}, out)
    assert not out.exists()  # every refusal came before any output


def test_remove_includes_experts_the_model_already_masks(tmp_path):
    model = tiny_model("mixtral")
    moe_sft.patch_model(model, MoESFTConfig(routing=RoutingConfig(disabled_experts={0: [7], 1: [2]})))
    export_removed(model, {0: [1], 1: [1]}, tmp_path / "out")
    meta = json.loads((tmp_path / "out" / "pruning.json").read_text())
    assert meta["pruned"] == {"0": [1, 7], "1": [1, 2]}
    assert AutoModelForCausalLM.from_pretrained(tmp_path / "out").config.num_local_experts == 6


# ---- strategies ----------------------------------------------------------------------------
def hand_profile(counts, max_abs=None, *, num_hidden_layers=None, gate_mass=None) -> ExpertProfile:
    counts = torch.tensor(counts, dtype=torch.int64)
    L, E = counts.shape
    return ExpertProfile(
        model="hand", model_type="qwen3_moe", num_hidden_layers=num_hidden_layers or L, num_experts=E, top_k=2,
        layers=list(range(L)), counts=counts,
        gate_mass=torch.tensor(gate_mass, dtype=torch.float32) if gate_mass is not None else counts.float() / 10,
        score_mass=counts.float() / 10,
        max_abs_output=torch.tensor(max_abs, dtype=torch.float32) if max_abs is not None else torch.ones(L, E),
    )  # fmt: skip


def test_least_and_most_used_pick_the_right_experts():
    prof = hand_profile(
        [[50, 3, 9, 0, 70, 3, 20, 1], [5, 6, 7, 8, 1, 2, 3, 4]],
        gate_mass=[[5.0, 0.2, 0.9, 0.0, 7.0, 0.1, 2.0, 0.1], [0.5, 0.6, 0.7, 0.8, 0.1, 0.2, 0.3, 0.4]],
    )
    # layer 0: 3 (0), 7 (1), then 1 and 5 tie on 3 tokens: 5 has less gate mass.
    assert select_experts(prof, "least_used", num=3) == {0: [3, 5, 7], 1: [4, 5, 6]}
    assert select_experts(prof, "least_used", ratio=0.25) == {0: [3, 7], 1: [4, 5]}
    assert select_experts(prof, "most_used", num=2) == {0: [0, 4], 1: [2, 3]}
    assert select_experts(prof, "least_used", num=2, exclude={0: [3]}) == {0: [5, 7], 1: [4, 5]}
    with pytest.raises(ConfigError, match="fewer than top_k=2"):
        select_experts(prof, "least_used", num=7)
    with pytest.raises(ConfigError, match="rounds to 0"):
        select_experts(prof, "least_used", ratio=0.05)
    with pytest.raises(ConfigError, match="exactly one of ratio"):
        select_experts(prof, "most_used")


def test_super_experts_rule():
    """8 decoder layers (the first 75% are layers 0-5), 64 experts: 512 maxima in [1, 2) plus planted
    ones. With 512 values the 99.5th percentile lies between the 4th and 3rd largest, so at most
    the three largest pass it."""
    def select(planted):
        values = 1 + torch.rand(8, 64, generator=torch.Generator().manual_seed(0))
        for (layer, expert), v in planted.items():
            values[layer, expert] = v
        prof = hand_profile(torch.ones(8, 64, dtype=torch.int64).tolist(), values.tolist())
        return select_experts(prof, "super_experts")

    # 2000 is the maximum; 1000 is in layer 6 (too deep); 150 passes the percentile (~68) but not
    # a tenth of the maximum (200).
    assert select({(1, 5): 2000.0, (6, 0): 1000.0, (2, 7): 150.0}) == {1: [5]}
    # 900, 1000, 2000 pass the percentile (~845); 800 is above a tenth of the maximum but below it.
    assert select({(1, 5): 2000.0, (3, 9): 1000.0, (4, 2): 900.0, (0, 1): 800.0}) == {1: [5], 3: [9], 4: [2]}
    with pytest.raises(ConfigError, match="no ratio/num"):
        select_experts(hand_profile([[1, 2, 3, 4]]), "super_experts", ratio=0.25)


def test_random_is_seeded_and_copies_the_controlled_counts():
    g = torch.Generator().manual_seed(1)
    values = 1 + torch.rand(8, 64, generator=g)
    values[0, 3], values[0, 9], values[2, 1] = 500.0, 400.0, 300.0  # super experts: 2 in layer 0, 1 in layer 2
    prof = hand_profile(torch.randint(0, 100, (8, 64), generator=g).tolist(), values.tolist(), num_hidden_layers=10)
    target = select_experts(prof, "super_experts")
    assert {k: len(v) for k, v in target.items()} == {0: 2, 2: 1}
    a = select_experts(prof, "random", controls="super_experts", seed=3)
    assert select_experts(prof, "random", controls="super_experts", seed=3) == a
    assert {k: len(v) for k, v in a.items()} == {0: 2, 2: 1}

    least = select_experts(prof, "least_used", ratio=0.25)
    draws = [select_experts(prof, "random", ratio=0.25, seed=s) for s in range(4)]
    assert draws[0] == select_experts(prof, "random", ratio=0.25, seed=0)
    assert len({json.dumps(d) for d in draws}) == 4  # different seeds, different experts
    for d in draws:
        assert {k: len(v) for k, v in d.items()} == {k: len(v) for k, v in least.items()} == {i: 16 for i in range(8)}
    excluded = select_experts(prof, "random", ratio=0.25, seed=0, exclude={i: list(range(8)) for i in range(8)})
    assert all(min(v) >= 8 for v in excluded.values())


# ---- CLI -----------------------------------------------------------------------------------
def test_cli_profile_then_prune_mask_and_remove(tmp_path):
    model, tok = tiny_model("qwen2_moe"), tiny_tokenizer()
    model.save_pretrained(tmp_path / "model")
    tok.save_pretrained(tmp_path / "model")
    data = tmp_path / "data.jsonl"
    data.write_text("".join(json.dumps({"text": t}) + "\n" for t in TEXTS))

    assert main(["profile", "--model", str(tmp_path / "model"), "--data", str(data), "--out", str(tmp_path / "prof")]) == 0
    assert {PROFILE_JSON, HEATMAP_PNG, CUMULATIVE_PNG} <= {p.name for p in (tmp_path / "prof").iterdir()}
    prof = ExpertProfile.load(tmp_path / "prof")
    assert prof.tokens == sum(len(t) for t in TEXTS) and prof.layers == [0, 2]  # layer 1 is dense
    expected = select_experts(prof, "least_used", num=2)

    common = ["--model", str(tmp_path / "model"), "--profile", str(tmp_path / "prof"), "--strategy", "least_used", "--num", "2"]
    assert main(["prune", *common, "--out", str(tmp_path / "mask")]) == 0
    masked_model = moe_sft.from_pretrained(tmp_path / "mask")
    assert moe_sft.get_handle(masked_model).config.routing.disabled_experts == expected
    # Pruning the masked checkpoint again: its masked experts stay masked, the next least used join them.
    again = ["--model", str(tmp_path / "mask"), "--profile", str(tmp_path / "prof"), "--strategy", "least_used", "--num", "1"]
    assert main(["prune", *again, "--out", str(tmp_path / "mask2")]) == 0
    routing = moe_sft.get_handle(moe_sft.from_pretrained(tmp_path / "mask2")).config.routing
    assert routing.disabled_experts == select_experts(prof, "least_used", num=3)
    assert main(["prune", *common, "--mode", "remove", "--out", str(tmp_path / "removed")]) == 0
    small = AutoModelForCausalLM.from_pretrained(tmp_path / "removed")
    assert small.config.num_experts == 6
    batch = {k: v for k, v in tiny_batch(small).items() if k != "labels"}
    with torch.no_grad():
        torch.testing.assert_close(small(**batch).logits, masked_model(**batch).logits, atol=1e-5, rtol=1e-5)

    # Bad requests fail before anything is written.
    assert main(["prune", *common[:-2], "--ratio", "0.9", "--out", str(tmp_path / "bad")]) == 2
    assert main(["prune", *common[:-4], "--strategy", "super_experts", "--mode", "remove", "--out", str(tmp_path / "bad")]) == 2
    assert not (tmp_path / "bad").exists()
