"""Condenser method: router bias (placements, update rule, once per optimizer step), condenser
experts (budgets, no double pick, gates, new experts), aux-loss free, checkpoints, two-phase
recipe, and a behavioural check that sparsify concentrates usage and balance spreads it.

Expected values are computed in the test from the formulas of DESIGN.md ("condenser"), from
the raw router logits captured with a forward hook on the router module.
"""

import json

import pytest
import torch
import torch.nn.functional as F
from transformers import Trainer, TrainerCallback, TrainingArguments

import moe_sft
from moe_sft import ConfigError, MoESFTCallback, MoESFTConfig
from moe_sft.methods.condenser import (
    GAMMA_DEFAULTS,
    CondenserConfig,
    CondensersConfig,
    RouterBiasConfig,
    load_phase2,
    phase2_config,
    router_bias,
    save_usage_profile,
    start_phase2,
    update_router_bias,
)
from moe_sft.routing import route
from moe_sft.testing import ALL_FAMILIES, CORE_FAMILIES, tiny_batch, tiny_model

SIGMOID_FAMILIES = {"deepseek_v3", "glm4_moe"}


def _cfg(bias=None, condensers=None, **kw):
    return MoESFTConfig(condenser=CondenserConfig(bias=bias or RouterBiasConfig(**kw), condensers=condensers))


def _capture(handle):
    """Per layer: the raw router logits z (forward hook on the router) and the Routing used."""
    seen = {m.layer_idx: {} for m in handle.layers}
    for m in handle.layers:
        d = seen[m.layer_idx]
        m.block.gate.register_forward_hook(lambda mod, i, o, d=d: d.__setitem__("z", o[0].detach()))
        m.controls.output_hooks.append(lambda b, x, r, y, d=d: (d.__setitem__("routing", r), y)[1])
    return seen


def _group_limit(sel, n_group, topk_group, how):
    T, E = sel.shape
    g = sel.view(T, n_group, E // n_group)
    score = g.max(-1).values if how == "max" else g.topk(2, -1).values.sum(-1)
    keep = torch.zeros_like(score, dtype=torch.bool)
    keep[torch.arange(T)[:, None], score.topk(topk_group, -1).indices] = True
    return torch.where(keep[:, :, None].expand_as(g), g, torch.full_like(g, float("-inf"))).reshape(T, E)


def _expected(spec, z, bias, placement, k_routed, forced=None, correction=None, overlap=False):
    """DESIGN.md: logits: p = f(z + b) for selection and gates; selection: T = TopK(s + b), gates
    from s. Condensers appended after the routed picks with their own score, renormalised with
    the routed weights where the family renormalises, then x routed_scaling_factor."""
    z = z.float() + (bias if placement == "logits" else 0)
    s = torch.softmax(z, -1) if spec.score_func == "softmax" else torch.sigmoid(z)
    sel = s.clone()
    if correction is not None:
        sel = sel + correction
    if placement == "selection":
        sel = sel + bias
    if forced is not None and not overlap:
        sel[:, forced] = float("-inf")
    if spec.group_score != "none":
        sel = _group_limit(sel, spec.n_group, spec.topk_group, spec.group_score)
    idx = sel.topk(k_routed, -1).indices
    w = s.gather(1, idx)
    if forced is not None:
        idx = torch.cat([idx, forced.expand(len(z), -1)], 1)
        w = torch.cat([w, s[:, forced]], 1)
    if spec.norm_topk_prob:
        w = w / w.sum(-1, keepdim=True)
    return idx, w * spec.routed_scaling_factor


def _by_expert(idx, w, E):
    """(T, E) gate weight per expert (0 where not selected): order-free comparison."""
    return torch.zeros(idx.shape[0], E, dtype=torch.float32).scatter_add_(1, idx, w.float())


# --------------------------------------------------------------------------- formulas
@pytest.mark.parametrize("placement", ["logits", "selection"])
@pytest.mark.parametrize("family", CORE_FAMILIES)
def test_biased_selection_and_gates_match_the_formula(family, placement):
    model = tiny_model(family)
    handle = moe_sft.patch_model(model, _cfg(placement=placement))
    g = torch.Generator().manual_seed(1)
    for m in handle.layers:
        router_bias(handle)[m.layer_idx].copy_(torch.randn(m.controls.spec.num_experts, generator=g))
        if family == "deepseek_v3":  # the family's own correction bias, selection only
            m.block.gate.e_score_correction_bias.copy_(torch.rand(m.controls.spec.num_experts, generator=g) * 0.1)
    seen = _capture(handle)
    with torch.no_grad():
        model(**tiny_batch(model))
    for m in handle.layers:
        spec, d = m.controls.spec, seen[m.layer_idx]
        corr = m.block.gate.e_score_correction_bias if family == "deepseek_v3" else None
        idx, w = _expected(spec, d["z"], router_bias(handle)[m.layer_idx], placement, spec.top_k, correction=corr)
        r = d["routing"]
        assert torch.equal(r.index.sort(1).values, idx.sort(1).values)
        torch.testing.assert_close(_by_expert(r.index, r.weights, spec.num_experts), _by_expert(idx, w, spec.num_experts))
    handle.revert()


def test_group_limited_routing_masks_with_minus_inf_under_a_negative_selection_bias():
    """DeepSeek-V3 with a selection bias that makes every biased score negative: experts of
    dropped groups must stay unselectable (a 0 mask would pick them)."""
    model = tiny_model("deepseek_v3")
    handle = moe_sft.patch_model(model, _cfg(placement="selection"))
    m = handle.layers[0]
    spec = m.controls.spec
    bias = -5.0 + torch.randn(spec.num_experts, generator=torch.Generator().manual_seed(2)) * 0.5
    router_bias(handle)[m.layer_idx].copy_(bias)
    seen = _capture(handle)
    with torch.no_grad():
        model(**tiny_batch(model))
    d = seen[m.layer_idx]
    idx, _ = _expected(spec, d["z"], bias, "selection", spec.top_k)
    assert torch.equal(d["routing"].index.sort(1).values, idx.sort(1).values)
    # the same computation with a 0 mask selects differently: the test can tell them apart
    s = torch.sigmoid(d["z"].float()) + bias
    grouped = s.view(len(s), spec.n_group, -1)
    gscore = grouped.topk(2, -1).values.sum(-1)
    keep = torch.zeros_like(gscore, dtype=torch.bool).scatter_(1, gscore.topk(spec.topk_group, -1).indices, True)
    zero_masked = torch.where(keep[:, :, None].expand_as(grouped), grouped, torch.zeros_like(grouped)).reshape(len(s), -1)
    assert not torch.equal(zero_masked.topk(spec.top_k, -1).indices.sort(1).values, idx.sort(1).values)
    handle.revert()


def _train_forward(model, batch):
    model.train()
    out = model(**batch)
    out.loss.backward()
    return out


@pytest.mark.parametrize("family", ["qwen3_moe", "deepseek_v3"])
@pytest.mark.parametrize("usage", ["soft", "count"])
@pytest.mark.parametrize("direction", ["sparsify", "balance"])
def test_bias_update_rule(family, direction, usage):
    """b <- b +/- gamma * sign(u - mean u), u summed over two micro-batches."""
    model = tiny_model(family)
    gamma = 0.01
    handle = moe_sft.patch_model(model, _cfg(direction=direction, usage=usage, gamma=gamma, clip=0.015))
    placement = "logits" if family not in SIGMOID_FAMILIES else "selection"
    seen = _capture(handle)
    expected_u = {m.layer_idx: torch.zeros(m.controls.spec.num_experts, dtype=torch.float64) for m in handle.layers}
    for b in router_bias(handle).values():  # start away from 0 so the clip at 0.015 shows
        b.copy_(torch.linspace(-0.01, 0.01, len(b)))
    before = {k: v.clone() for k, v in router_bias(handle).items()}
    for seed in (0, 1):
        _train_forward(model, tiny_batch(model, seed=seed))
        for m in handle.layers:
            r = seen[m.layer_idx]["routing"]
            z = seen[m.layer_idx]["z"].float()
            E = m.controls.spec.num_experts
            if usage == "count":
                u = torch.bincount(r.index.reshape(-1), minlength=E).double()
            elif placement == "logits":  # sum over tokens of p = softmax(z + b)
                u = torch.softmax(z + before[m.layer_idx], -1).sum(0).double()
            else:  # gate mass: sum of s_e over the tokens that picked e
                s = torch.sigmoid(z)
                u = torch.zeros(E).index_add_(0, r.index.reshape(-1), s.gather(1, r.index).reshape(-1)).double()
            expected_u[m.layer_idx] += u
    assert update_router_bias(handle) is True
    sign = -1.0 if direction == "balance" else 1.0
    for m in handle.layers:
        u = expected_u[m.layer_idx]
        want = (before[m.layer_idx] + gamma * sign * torch.sign(u - u.mean()).float()).clamp(-0.015, 0.015)
        torch.testing.assert_close(router_bias(handle)[m.layer_idx], want, atol=1e-7, rtol=0)
        assert router_bias(handle)[m.layer_idx].dtype == torch.float32
        assert not torch.equal(router_bias(handle)[m.layer_idx], before[m.layer_idx])
    assert update_router_bias(handle) is False  # usage was consumed: no second update
    handle.revert()


def test_no_update_from_eval_or_no_grad_forwards():
    model = tiny_model("qwen2_moe")
    handle = moe_sft.patch_model(model, _cfg(gamma=0.01))
    batch = tiny_batch(model)
    model.eval()
    model(**batch)
    model.train()
    with torch.no_grad():
        model(**batch)
    assert update_router_bias(handle) is False
    assert all(not b.any() for b in router_bias(handle).values())
    handle.revert()


# --------------------------------------------------------------------------- condensers
def _ids(handle, pick):
    return {m.layer_idx: pick(m) for m in handle.layers}


@pytest.mark.parametrize("budget", ["compute_neutral", "additive"])
@pytest.mark.parametrize("family", CORE_FAMILIES)
def test_condenser_budgets_gates_and_no_double_pick(family, budget):
    model = tiny_model(family)
    probe = moe_sft.patch_model(model)
    seen = _capture(probe)
    with torch.no_grad():
        model(**tiny_batch(model))
    # condensers = each layer's two most-picked experts, so routing would pick them often
    most = {k: torch.bincount(d["routing"].index.reshape(-1)).topk(2).indices.tolist() for k, d in seen.items()}
    probe.revert()
    r, k = 2, 4
    cc = CondensersConfig(num=r, budget=budget, experts=most)
    handle = moe_sft.patch_model(model, _cfg(gamma=0.01, condensers=cc))
    placement = "logits" if family not in SIGMOID_FAMILIES else "selection"
    for m in handle.layers:
        router_bias(handle)[m.layer_idx].copy_(torch.randn(m.controls.spec.num_experts) * 0.3)
    seen = _capture(handle)
    with torch.no_grad():
        model(**tiny_batch(model))
    k_routed = k - r if budget == "compute_neutral" else k
    for m in handle.layers:
        spec, d = m.controls.spec, seen[m.layer_idx]
        forced = torch.tensor(most[m.layer_idx])
        idx = d["routing"].index
        assert idx.shape == (idx.shape[0], k if budget == "compute_neutral" else k + r)
        assert d["routing"].num_routed == k_routed
        assert torch.equal(idx[:, k_routed:], forced.expand(len(idx), -1))
        assert not torch.isin(idx[:, :k_routed], forced).any()  # a condenser is never also routed
        corr = m.block.gate.e_score_correction_bias if family == "deepseek_v3" else None
        want_idx, want_w = _expected(spec, d["z"], router_bias(handle)[m.layer_idx], placement, k_routed, forced, corr)
        assert torch.equal(idx.sort(1).values, want_idx.sort(1).values)
        got = _by_expert(idx, d["routing"].weights, spec.num_experts)
        torch.testing.assert_close(got, _by_expert(want_idx, want_w, spec.num_experts))
        if spec.norm_topk_prob:
            torch.testing.assert_close(got.sum(1), torch.full((len(idx),), spec.routed_scaling_factor))
    handle.revert()


def test_allow_overlap_lets_a_condenser_take_a_routed_slot():
    model = tiny_model("qwen3_moe")
    probe = moe_sft.patch_model(model)
    seen = _capture(probe)
    with torch.no_grad():
        model(**tiny_batch(model))
    most = {k: torch.bincount(d["routing"].index.reshape(-1)).topk(2).indices.tolist() for k, d in seen.items()}
    probe.revert()
    cc = CondensersConfig(experts=most, allow_overlap=True, budget="additive")
    handle = moe_sft.patch_model(model, _cfg(condensers=cc))
    seen = _capture(handle)
    with torch.no_grad():
        model(**tiny_batch(model))
    for m in handle.layers:
        idx = seen[m.layer_idx]["routing"].index
        assert torch.isin(idx[:, :4], torch.tensor(most[m.layer_idx])).any()
    handle.revert()


def test_learned_gate_for_longtail_condensers():
    """gate: learned: g_j(x) = sigmoid(u_j . x), renormalised with the routed weights (qwen3
    normalises), and u gets a gradient."""
    model = tiny_model("qwen3_moe")
    experts = {0: [0, 1], 1: [2, 3]}
    handle = moe_sft.patch_model(model, _cfg(condensers=CondensersConfig(gate="learned", experts=experts)))
    for m in handle.layers:
        with torch.no_grad():
            m.controls.forced_weights.weight.normal_(0, 0.3)
    seen = _capture(handle)
    x_in = {}
    for m in handle.layers:
        m.block.gate.register_forward_hook(lambda mod, i, o, k=m.layer_idx: x_in.__setitem__(k, i[0].detach()))
    _train_forward(model, tiny_batch(model))
    for m in handle.layers:
        r = seen[m.layer_idx]["routing"]
        s = torch.softmax(seen[m.layer_idx]["z"].float() + router_bias(handle)[m.layer_idx], -1)
        routed = s.gather(1, r.index[:, :2])
        g = torch.sigmoid(x_in[m.layer_idx] @ m.controls.forced_weights.weight.t())
        w = torch.cat([routed, g], 1)
        torch.testing.assert_close(r.weights, w / w.sum(1, keepdim=True))
        assert m.controls.forced_weights.weight.grad.abs().sum() > 0
    handle.revert()


@pytest.mark.parametrize(
    "family,k,r",
    [("mixtral", 2, 2), ("qwen2_moe", 4, 4), ("deepseek_v2", 4, 5)],
)
def test_compute_neutral_needs_r_below_k(family, k, r):
    model = tiny_model(family, num_experts_per_tok=k)
    cfg = _cfg(condensers=CondensersConfig(num=r, longtail_from="profile", profile="unused.json"))
    with pytest.raises(ConfigError, match=rf"num = {r} .*top_k = {k}"):
        moe_sft.patch_model(model, cfg)
    assert moe_sft.get_handle(model) is None  # nothing left patched


def test_config_errors_name_the_problem(tmp_path):
    with pytest.raises(ConfigError, match="gate = 'router_prob' with source = 'new'"):
        CondensersConfig(source="new", gate="router_prob")
    with pytest.raises(ConfigError, match="needs condenser.condensers.profile"):
        CondensersConfig(longtail_from="profile")
    with pytest.raises(ConfigError, match="gamma = -0.1"):
        RouterBiasConfig(gamma=-0.1)
    with pytest.raises(ConfigError, match="enables nothing"):
        CondenserConfig(bias=RouterBiasConfig(enabled=False))
    with pytest.raises(ConfigError, match="unknown config key.*condenser.bias.gama"):
        MoESFTConfig.from_dict({"condenser": {"bias": {"gama": 1e-3}}})
    with pytest.raises(ConfigError, match="'sparse' is not one of"):
        MoESFTConfig.from_dict({"condenser": {"bias": {"direction": "sparse"}}})
    model = tiny_model("olmoe")
    profile = tmp_path / "usage.json"
    profile.write_text(json.dumps({"format": "moe_sft.usage_profile/1", "usage": {"0": [1, 2, 3]}}))
    with pytest.raises(ConfigError, match="needs the usage of MoE layer 0 \\(8 experts\\)"):
        moe_sft.patch_model(model, _cfg(condensers=CondensersConfig(longtail_from="profile", profile=str(profile))))
    # longtail from an untrained (all-zero) bias cannot choose
    with pytest.raises(ConfigError, match="all equal.*start_phase2"):
        moe_sft.patch_model(model, _cfg(condensers=CondensersConfig()))


def test_gamma_defaults_cover_every_family():
    assert set(GAMMA_DEFAULTS) == set(ALL_FAMILIES)
    assert GAMMA_DEFAULTS["qwen2_moe"] == GAMMA_DEFAULTS["mixtral"] == 1e-3
    assert GAMMA_DEFAULTS["deepseek_v2"] == GAMMA_DEFAULTS["olmoe"] == 1e-4


# --------------------------------------------------------------------------- aux loss, revert
@pytest.mark.parametrize("family", ["qwen2_moe", "mixtral"])
def test_aux_loss_is_off_while_patched_and_back_after_revert(family):
    model = tiny_model(family)
    batch = tiny_batch(model)
    with torch.no_grad():
        stock = model(**batch)
    assert stock.aux_loss is not None and stock.aux_loss > 0
    state = {k: v.clone() for k, v in model.state_dict().items()}
    handle = moe_sft.patch_model(model, _cfg())
    with torch.no_grad():
        out = model(**batch)
    ce = F.cross_entropy(out.logits[:, :-1].reshape(-1, out.logits.shape[-1]), batch["labels"][:, 1:].reshape(-1))
    torch.testing.assert_close(out.loss, ce)  # no aux term, though aux_loss is still reported
    assert not torch.allclose(stock.loss, ce)
    handle.revert()
    with torch.no_grad():
        again = model(**batch)
    assert torch.equal(again.loss, stock.loss) and torch.equal(again.logits, stock.logits)
    assert model.state_dict().keys() == state.keys()


# --------------------------------------------------------------------------- new condensers
@pytest.mark.parametrize("family", CORE_FAMILIES)
def test_new_condensers_leave_step0_outputs_exact(family):
    model = tiny_model(family)
    batch = tiny_batch(model)
    with torch.no_grad():
        stock = model(**batch).logits
    handle = moe_sft.patch_model(model)
    experts = {m.layer_idx: [5, 6, 7] for m in handle.layers}
    handle.revert()
    cfg = _cfg(condensers=CondensersConfig(source="new", experts=experts))
    handle = moe_sft.patch_model(model, cfg)
    with torch.no_grad():
        out = model(**batch).logits
    assert torch.equal(out, stock)
    assert handle.config.condenser.condensers.budget == "additive"
    handle.revert()


def test_new_condensers_init_from_usage_weighted_longtail_and_train(tmp_path):
    model = tiny_model("qwen3_moe")
    E = 8
    usage = {0: [400, 300, 150, 80, 30, 20, 15, 5], 1: [5, 500, 20, 10, 300, 100, 60, 5]}
    path = tmp_path / "usage.json"
    path.write_text(json.dumps({"format": "moe_sft.usage_profile/1", "usage": {str(k): v for k, v in usage.items()}}))
    cc = CondensersConfig(source="new", longtail_from="profile", profile=str(path))
    handle = moe_sft.patch_model(model, _cfg(gamma=0.01, condensers=cc))
    for m in handle.layers:
        u = torch.tensor(usage[m.layer_idx], dtype=torch.float64)
        order = sorted(range(E), key=lambda e: -u[e])
        covered, head = 0.0, []
        for e in order:  # smallest most-used set covering 90% (the crossing expert included)
            head.append(e)
            covered += float(u[e]) / float(u.sum())
            if covered >= 0.9:
                break
        tail = [e for e in order if e not in head]
        assert handle.config.condenser.condensers.experts[m.layer_idx] == tail
        new = m.controls.new_condensers
        for j in range(2):
            share = tail[j::2]
            w = u[share] / u[share].sum()
            want = sum(float(w[i]) * m.block.experts.gate_up_proj[e] for i, e in enumerate(share))
            torch.testing.assert_close(new.gate_up_proj[j], want)
            want = sum(float(w[i]) * m.block.experts.down_proj[e] for i, e in enumerate(share))
            torch.testing.assert_close(new.down_proj[j], want)
        assert torch.equal(new.scale, torch.zeros(2))
    params = {n: p.detach().clone() for n, p in model.named_parameters() if "new_condensers" in n}
    assert len(params) == 4 * len(handle.layers)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2, weight_decay=0.0)
    for step in range(2):
        _train_forward(model, tiny_batch(model, seed=step))
        opt.step()
        opt.zero_grad()
        now = {n: p.detach() for n, p in model.named_parameters() if "new_condensers" in n}
        if step == 0:  # only the zero-initialised scale has a gradient at step 0
            assert all(not torch.equal(now[n], params[n]) for n in params if n.endswith("scale"))
    assert all(not torch.equal(now[n], params[n]) for n in params)  # everything trains from step 1
    handle.revert()


# --------------------------------------------------------------------------- once per step (Trainer)
class _Rows(torch.utils.data.Dataset):
    def __init__(self, model, n, seq=12):
        b = tiny_batch(model, batch=n, seq=seq, seed=3)
        self.rows = [{k: v[i] for k, v in b.items()} for i in range(n)]

    def __len__(self):
        return len(self.rows)

    def __getitem__(self, i):
        return self.rows[i]


def _args(tmp_path, **kw):
    base = dict(
        output_dir=str(tmp_path),
        per_device_train_batch_size=2,
        learning_rate=1e-3,
        logging_strategy="no",
        save_strategy="no",
        report_to=[],
        use_cpu=True,
        disable_tqdm=True,
        seed=0,
        data_seed=0,
        lr_scheduler_type="constant",
    )
    return TrainingArguments(**{**base, **kw})


def test_trainer_updates_once_per_optimizer_step_with_accumulation_and_checkpointing(tmp_path):
    """GA = 2 with activation checkpointing, through a plain Trainer with MoESFTCallback: each
    update uses the usage of exactly two micro-batches (counted independently by the
    foundation's usage stats), though the router runs twice per micro-batch (forward +
    recompute)."""
    model = tiny_model("qwen2_moe")
    gamma = 0.01
    handle = moe_sft.patch_model(model, MoESFTConfig(track_usage=True, condenser=CondenserConfig(bias=RouterBiasConfig(gamma=gamma))))
    model.activation_checkpointing_enable()
    router_calls = [0]
    handle.layers[0].block.gate.register_forward_hook(lambda *a: router_calls.__setitem__(0, router_calls[0] + 1))
    log = [{"bias": {k: v.clone() for k, v in router_bias(handle).items()}, "router_calls": 0,
            "totals": {m.layer_idx: int(m.controls.usage_total.sum()) for m in handle.layers}}]  # fmt: skip

    class Record(TrainerCallback):  # runs after MoESFTCallback's update
        def on_step_end(self, args, state, control, **kw):
            log.append({"bias": {k: v.clone() for k, v in router_bias(handle).items()},
                        "usage": {k: (s.score_mass.clone(), int(s.tokens)) for k, s in handle.usage().items()},
                        "totals": {m.layer_idx: int(m.controls.usage_total.sum()) for m in handle.layers},
                        "router_calls": router_calls[0]})  # fmt: skip
            handle.usage(reset=True)

    trainer = Trainer(model=model, args=_args(tmp_path, gradient_accumulation_steps=2, max_steps=3),
                      train_dataset=_Rows(model, 12), callbacks=[Record(), MoESFTCallback(expert_load=False)])  # fmt: skip
    trainer.train()
    assert len(log) == 4
    for before, entry in zip(log, log[1:]):
        for layer, (soft, tokens) in entry["usage"].items():
            assert tokens == 2 * 2 * 12  # two micro-batches of 2 x 12 tokens
            step = gamma * torch.sign(soft.double() - soft.double().mean()).float()
            torch.testing.assert_close(entry["bias"][layer], before["bias"][layer] + step, atol=1e-7, rtol=0)
            # the method's own record of the step: 48 tokens x top-4 routed picks
            assert entry["totals"][layer] - before["totals"][layer] == 48 * 4
        assert entry["router_calls"] - before["router_calls"] == 4  # recomputed in backward, not recorded
    handle.revert()


def test_plain_trainer_checkpoint_resume_continues_biases_exactly(tmp_path):
    """A plain transformers Trainer with MoESFTCallback: its checkpoints are patched
    checkpoints, and resuming one continues the bias, usage totals and weights exactly."""

    def run(max_steps, resume=None, save_steps=None):
        model = tiny_model("qwen3_moe")
        handle = moe_sft.patch_model(model, _cfg(gamma=0.01))
        kw = dict(save_strategy="steps", save_steps=save_steps) if save_steps else {}
        trainer = Trainer(model=model, args=_args(tmp_path / "run", max_steps=max_steps, **kw),
                          train_dataset=_Rows(model, 16), callbacks=[MoESFTCallback()])  # fmt: skip
        trainer.train(resume_from_checkpoint=resume)
        state = {k: v.clone() for k, v in model.state_dict().items()}
        return {k: v.clone() for k, v in router_bias(handle).items()}, {m.layer_idx: m.controls.usage_total.clone() for m in handle.layers}, state

    full_bias, full_total, full_state = run(4)
    run(2, save_steps=2)
    assert (tmp_path / "run" / "checkpoint-2" / "moe_sft_tensors.safetensors").is_file()
    resumed_bias, resumed_total, resumed_state = run(4, resume=str(tmp_path / "run" / "checkpoint-2"))
    for k in full_bias:
        assert full_bias[k].abs().sum() > 0
        assert torch.equal(resumed_bias[k], full_bias[k])
        assert torch.equal(resumed_total[k], full_total[k])
    for k, v in full_state.items():  # fused experts included (the checkpoint keeps the runtime layout)
        assert torch.equal(resumed_state[k], v), k


# --------------------------------------------------------------------------- checkpoints + recipe
@pytest.mark.parametrize("family", CORE_FAMILIES)
def test_phase1_to_phase2_and_save_restore(family, tmp_path):
    model = tiny_model(family)
    handle = moe_sft.patch_model(model, _cfg(gamma=0.01))
    opt = torch.optim.SGD(model.parameters(), lr=1e-2)
    for step in range(2):
        _train_forward(model, tiny_batch(model, seed=step))
        opt.step()
        opt.zero_grad()
        update_router_bias(handle)
    moe_sft.save_pretrained(model, tmp_path / "phase1")
    handle.revert()

    model = load_phase2(tmp_path / "phase1")
    handle = moe_sft.get_handle(model)
    cfg = handle.config.condenser
    assert cfg.bias.gamma == 5e-5 and cfg.condensers.num == 2
    for m in handle.layers:  # the r lowest-bias experts after phase 1
        bias = router_bias(handle)[m.layer_idx]
        chosen = cfg.condensers.experts[m.layer_idx]
        assert torch.equal(m.controls.forced, torch.tensor(chosen))
        assert bias[chosen].max() <= bias[[e for e in range(len(bias)) if e not in chosen]].min()
    before = {k: v.clone() for k, v in router_bias(handle).items()}
    _train_forward(model, tiny_batch(model))
    update_router_bias(handle)
    for k, b in router_bias(handle).items():  # phase 2 steps by gamma = 5e-5
        moved = (b - before[k]).abs()
        assert ((moved - 5e-5).abs() < 1e-9).all(), moved

    moe_sft.save_pretrained(model, tmp_path / "phase2")
    batch = tiny_batch(model, seed=9)
    model.eval()
    with torch.no_grad():
        want = model(**batch).logits
    restored = moe_sft.from_pretrained(tmp_path / "phase2")
    h2 = moe_sft.get_handle(restored)
    assert h2.config.condenser == handle.config.condenser
    for k, v in handle.extra_state_dict().items():
        assert torch.equal(h2.extra_state_dict()[k], v), k
    with torch.no_grad():
        assert torch.equal(restored(**batch).logits, want)


def test_new_condensers_save_restore_and_phase2_step0_identity(tmp_path):
    model = tiny_model("deepseek_v2")
    handle = moe_sft.patch_model(model, _cfg(gamma=0.01))
    for step in range(2):
        _train_forward(model, tiny_batch(model, seed=step))
        update_router_bias(handle)
    model.eval()
    batch = tiny_batch(model, seed=5)
    with torch.no_grad():
        phase1_logits = model(**batch).logits
    start_phase2(model, phase2_config(handle.config.condenser, CondensersConfig(source="new")))
    with torch.no_grad():
        assert torch.equal(model(**batch).logits, phase1_logits)  # zero output scale
        for m in handle.layers:
            m.controls.new_condensers.scale.fill_(0.5)
        moved = model(**batch).logits
    assert not torch.equal(moved, phase1_logits)
    moe_sft.save_pretrained(model, tmp_path / "p2")
    restored = moe_sft.from_pretrained(tmp_path / "p2")
    with torch.no_grad():
        assert torch.equal(restored(**batch).logits, moved)
    keys = [k for k in moe_sft.get_handle(restored).extra_state_dict() if "new_condensers" in k]
    assert len(keys) == 4 * len(handle.layers)


def test_longtail_from_profile_and_usage_profile_roundtrip(tmp_path):
    model = tiny_model("qwen3_moe")
    handle = moe_sft.patch_model(model, _cfg(gamma=0.01))
    for step in range(2):
        _train_forward(model, tiny_batch(model, seed=step))
        update_router_bias(handle)
    totals = {m.layer_idx: m.controls.usage_total.clone() for m in handle.layers}
    assert all(int(t.sum()) == 2 * 2 * 12 * 4 for t in totals.values())  # tokens x top-k, both steps
    save_usage_profile(handle, tmp_path / "usage.json")
    handle.revert()
    cc = CondensersConfig(longtail_from="profile", profile=str(tmp_path / "usage.json"))
    handle = moe_sft.patch_model(model, _cfg(condensers=cc))
    for m in handle.layers:
        chosen = handle.config.condenser.condensers.experts[m.layer_idx]
        t = totals[m.layer_idx]
        others = [e for e in range(len(t)) if e not in chosen]
        assert t[chosen].max() <= t[others].min()
    handle.revert()


def test_bias_stays_fp32_in_a_bf16_model():
    model = tiny_model("qwen3_moe")
    handle = moe_sft.patch_model(model, _cfg(gamma=1e-3))
    model.to(torch.bfloat16)  # casts float buffers too
    with torch.no_grad():
        router_bias(handle)[0].fill_(1.0)
    _train_forward(model, tiny_batch(model))
    update_router_bias(handle)
    b = router_bias(handle)[0]
    assert b.dtype == torch.float32
    torch.testing.assert_close((b - 1.0).abs(), torch.full_like(b, 1e-3), atol=1e-6, rtol=0)  # bf16 would round to 1
    assert handle.layers[0].controls.usage_total.dtype == torch.int64
    handle.revert()


# --------------------------------------------------------------------------- behaviour
def _usage_entropy(model, handle, batch):
    """Per-layer entropy of the routed-pick distribution on a fixed batch (eval forward)."""
    seen = {}
    hooks = [m.block.gate.register_forward_hook(lambda mod, i, o, k=m.layer_idx: seen.__setitem__(k, o[0])) for m in handle.layers]
    model.eval()
    with torch.no_grad():
        model(**batch)
    for h in hooks:
        h.remove()
    out = {}
    for m in handle.layers:
        r = route(m.controls.spec, seen[m.layer_idx], m.controls, m.block._moe_sft_adapter.selection_correction(m.block))
        p = torch.bincount(r.index.reshape(-1), minlength=m.controls.spec.num_experts).double()
        p = p / p.sum()
        out[m.layer_idx] = float(-(p[p > 0] * p[p > 0].log()).sum())
    return out


@pytest.mark.parametrize("family,skew,gamma", [("qwen3_moe", 1.0, 0.08), ("deepseek_v3", 0.1, 0.02)])
def test_sparsify_concentrates_usage_and_balance_spreads_it(family, skew, gamma):
    """6 training steps from the same skewed bias (so that there is room both ways): the
    usage entropy of every layer on a held-out batch falls with sparsify, rises with balance."""
    held_out = tiny_batch(tiny_model(family), batch=4, seq=32, seed=100)
    result = {}
    for direction in ("sparsify", "balance"):
        model = tiny_model(family)
        handle = moe_sft.patch_model(model, _cfg(direction=direction, gamma=gamma))
        for b in router_bias(handle).values():
            b.copy_(torch.linspace(-skew, skew, len(b)))
        start = _usage_entropy(model, handle, held_out)
        opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
        for step in range(6):
            _train_forward(model, tiny_batch(model, batch=2, seq=16, seed=step))
            opt.step()
            opt.zero_grad()
            update_router_bias(handle)
        result[direction] = (start, _usage_entropy(model, handle, held_out))
        handle.revert()
    assert result["sparsify"][0] == result["balance"][0]
    for layer, h0 in result["sparsify"][0].items():
        assert result["sparsify"][1][layer] < h0 - 0.05, (layer, h0, result["sparsify"][1][layer])
        assert result["balance"][1][layer] > h0 + 0.05, (layer, h0, result["balance"][1][layer])
