"""MoE-Bias head (`moe_bias_head`): zero-init identity, head output and aux loss against direct
computations, entropy gating and its threshold buffer, environment overrides, generate(),
adapter mode. The head is family-independent: identity and generate() run on every core
family, the rest on one or two."""

from __future__ import annotations


import pytest
import torch
import torch.nn.functional as F
from transformers.models.mixtral.modeling_mixtral import load_balancing_loss_func

import moe_sft
from moe_sft import ConfigError, MoEBiasHeadConfig, MoESFTConfig
from moe_sft.methods import moe_bias_head
from moe_sft.methods.moe_bias_head import ADAPTER_CONFIG_NAME, ADAPTER_WEIGHTS_NAME, MoEBiasHead, load_balance_loss
from moe_sft.testing import CORE_FAMILIES, tiny_batch, tiny_model

ENV_VARS = ("MOE_BIAS_ENABLED", "MOE_BIAS_NUM_EXPERTS", "MOE_BIAS_TOP_K", "MOE_BIAS_LOAD_BALANCE_WEIGHT")


@pytest.fixture(autouse=True)
def clean_env(monkeypatch):
    for var in ENV_VARS:
        monkeypatch.delenv(var, raising=False)


def patched(family="qwen3_moe", seed=0, **head):
    model = tiny_model(family, seed=seed)
    handle = moe_sft.patch_model(model, MoESFTConfig(moe_bias_head=MoEBiasHeadConfig(**head)))
    return model, handle, moe_sft.get_moe_bias_layer(model)


def randomise(head, std=0.5, seed=1):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        head.bias.copy_(torch.randn(head.bias.shape, generator=g) * std)
        head.gate.weight.copy_(torch.randn(head.gate.weight.shape, generator=g))


def entropy(logits):
    return torch.distributions.Categorical(logits=logits.float()).entropy()


# ---- 1. zero initialisation: exactly the base model ---------------------------------------


@pytest.mark.parametrize("apply_to", ["all", "top_entropy"])
@pytest.mark.parametrize("family", CORE_FAMILIES)
def test_zero_init_logits_equal_base_and_revert(family, apply_to):
    model = tiny_model(family)
    batch = tiny_batch(model)
    stock_keys = set(model.state_dict())
    with torch.no_grad():
        ref = model(**batch).logits
    handle = moe_sft.patch_model(model, MoESFTConfig(moe_bias_head=MoEBiasHeadConfig(apply_to=apply_to)))
    head = moe_sft.get_moe_bias_layer(model)
    assert head is not None and torch.count_nonzero(head.bias) == 0
    assert set(handle.extra_state_dict()) == {f"moe_bias_head.{k}" for k in head.state_dict()}
    model.train()
    out = model(**batch)  # a training forward (also updates the threshold under top_entropy)
    assert torch.equal(out.logits, ref)
    handle.revert()
    assert moe_sft.get_moe_bias_layer(model) is None and set(model.state_dict()) == stock_keys
    model.eval()
    with torch.no_grad():
        assert torch.equal(model(**batch).logits, ref)


def test_no_block_no_head():
    model = tiny_model("olmoe")
    handle = moe_sft.patch_model(model, MoESFTConfig())
    assert moe_sft.get_moe_bias_layer(model) is None and handle.config.moe_bias_head is None
    assert not handle.extra_state_dict()
    handle.revert()


def test_tied_embeddings_and_bf16():
    model = tiny_model("qwen3_moe", tie_word_embeddings=True, dtype=torch.bfloat16)
    assert model.get_output_embeddings().weight is model.get_input_embeddings().weight
    batch = tiny_batch(model)
    with torch.no_grad():
        ref = model(**batch).logits
        handle = moe_sft.patch_model(model, MoESFTConfig(moe_bias_head=MoEBiasHeadConfig()))
        head = moe_sft.get_moe_bias_layer(model)
        assert head.bias.dtype == torch.bfloat16
        assert torch.equal(model(**batch).logits, ref)
        randomise(head)
        out = model(**batch, output_hidden_states=True)
    assert out.logits.dtype == torch.bfloat16
    # The bias mixes in the logits' dtype: compare with the fp32 sum at bf16 resolution.
    probs = torch.softmax(out.hidden_states[-1].float() @ head.gate.weight.float().T, -1)
    top, idx = probs.topk(2, -1)
    expected = ref.float() + ((top / top.sum(-1, keepdim=True)).unsqueeze(-1) * head.bias.float()[idx]).sum(-2)
    torch.testing.assert_close(out.logits.float(), expected, atol=0.1, rtol=0.02)
    handle.revert()
    assert model.get_output_embeddings().weight is model.get_input_embeddings().weight


def test_threshold_stays_fp32_when_model_is_cast():
    model, handle, head = patched("olmoe", apply_to="top_entropy")
    head.entropy_threshold.fill_(3.01)
    model.to(torch.bfloat16)
    assert head.bias.dtype == torch.bfloat16 and head.entropy_threshold.dtype == torch.float32
    assert head.entropy_threshold.item() == pytest.approx(3.01)
    saved = model.state_dict()["moe_bias_head.entropy_threshold"]  # what checkpoints write
    assert saved.dtype == torch.float32 and torch.equal(saved, head.entropy_threshold)
    handle.revert()


# ---- 2. head output, aux loss, loss -------------------------------------------------------


@pytest.mark.parametrize("family", ["qwen2_moe", "deepseek_v3"])
@pytest.mark.parametrize("top_k", [1, 2, 5])
def test_head_output_matches_direct_computation(family, top_k):
    model, handle, head = patched(family, num_experts=6, top_k=top_k)
    randomise(head)
    batch = tiny_batch(model)
    with torch.no_grad():
        out = model(**batch, output_hidden_states=True)
        h = out.hidden_states[-1]  # (B, S, H): the lm_head input
        base = h @ model.get_output_embeddings().weight.T
        probs = torch.softmax(h @ head.gate.weight.T, dim=-1)  # (B, S, E)
        expected = base.clone()
        for b in range(h.shape[0]):
            for s in range(h.shape[1]):
                order = sorted(range(6), key=lambda e: -probs[b, s, e].item())[:top_k]
                total = sum(probs[b, s, e] for e in order)
                for e in order:
                    expected[b, s] += probs[b, s, e] / total * head.bias[e]
    torch.testing.assert_close(out.logits, expected, atol=1e-5, rtol=1e-5)
    handle.revert()


def test_load_balance_loss_known_routing():
    # E=4, k=2, four tokens. Top-2: t0 {0,1}, t1 {0,1}, t2 {0,2}, t3 {3,2}.
    probs = torch.tensor(
        [[0.5, 0.3, 0.1, 0.1], [0.4, 0.4, 0.1, 0.1], [0.6, 0.1, 0.2, 0.1], [0.1, 0.1, 0.3, 0.5]]
    )
    index = probs.topk(2, -1).indices
    # f = counts / N = [3, 2, 2, 1] / 4; P = column means = [0.4, 0.225, 0.175, 0.2]
    expected = 4 * (0.75 * 0.4 + 0.5 * 0.225 + 0.5 * 0.175 + 0.25 * 0.2)
    assert load_balance_loss(probs, index, 4).item() == pytest.approx(expected, abs=1e-6)
    # Same convention as transformers' Switch/Mixtral load_balancing_loss_func.
    logits = torch.randn(50, 7, generator=torch.Generator().manual_seed(0))
    p = torch.softmax(logits, -1)
    torch.testing.assert_close(
        load_balance_loss(p, p.topk(3, -1).indices, 7), load_balancing_loss_func((logits,), 7, 3)
    )
    # A mask selects the tokens (padding, entropy gating); none selected gives 0.
    keep = torch.arange(50) % 3 == 0
    torch.testing.assert_close(
        load_balance_loss(p, p.topk(3, -1).indices, 7, keep), load_balancing_loss_func((logits[keep],), 7, 3)
    )
    assert load_balance_loss(p, p.topk(3, -1).indices, 7, torch.zeros(50, dtype=torch.bool)).item() == 0


@pytest.mark.parametrize("weight", [0.0, 0.3])
def test_aux_loss_added_to_training_loss(weight):
    model, handle, head = patched("mixtral", load_balance_weight=weight)
    with torch.no_grad():
        head.bias.normal_(0, 0.5)
    batch = tiny_batch(model)
    batch["attention_mask"][1, 8:] = 0  # padding: left out of the aux loss
    batch["labels"][1, 8:] = -100
    model.config.output_router_logits = False  # only our term besides cross-entropy
    model.train()
    out = model(**batch, output_hidden_states=True)
    ce = F.cross_entropy(out.logits[:, :-1].reshape(-1, out.logits.shape[-1]), batch["labels"][:, 1:].reshape(-1))
    gate_logits = (out.hidden_states[-1] @ head.gate.weight.T).reshape(-1, head.config.num_experts)
    aux = load_balancing_loss_func((gate_logits,), head.config.num_experts, head.config.top_k, batch["attention_mask"])
    torch.testing.assert_close(head.last_aux_loss, aux)
    torch.testing.assert_close(out.loss, ce + weight * aux)
    out.loss.backward()
    # The aux term is the gate's only gradient path besides the bias mix.
    assert head.gate.weight.grad is not None and head.bias.grad is not None
    handle.revert()


def test_aux_loss_reaches_gate_with_zero_bias():
    # With zero biases the logits do not depend on the gate; its gradient comes from aux only.
    for weight, has_grad in ((0.01, True), (0.0, False)):
        model, handle, head = patched("qwen3_moe", load_balance_weight=weight)
        model.train()
        model(**tiny_batch(model)).loss.backward()
        assert (head.gate.weight.grad.abs().sum() > 0).item() is has_grad
        handle.revert()


# ---- 3. entropy gating ----------------------------------------------------------------------


def test_entropy_gating_reaches_exactly_tokens_at_or_above_threshold():
    model, handle, head = patched("deepseek_v2", apply_to="top_entropy")
    randomise(head)
    batch = tiny_batch(model, batch=3, seq=10)
    with torch.no_grad():
        with moe_sft.moe_bias_disabled(model):
            base = model(**batch).logits
        ent = entropy(base)
        thr = ent.flatten().median()
        head.entropy_threshold.fill_(thr)
        out = model(**batch, output_hidden_states=True)
    biased = out.logits
    changed = (biased != base).any(-1)
    assert torch.equal(changed, ent >= thr)
    assert 0 < changed.sum() < changed.numel()
    assert torch.equal(biased[~changed], base[~changed])
    # The load-balance loss covers the biased tokens only.
    gate_logits = out.hidden_states[-1][changed] @ head.gate.weight.T
    torch.testing.assert_close(head.last_aux_loss, load_balancing_loss_func((gate_logits,), 16, 2))
    handle.revert()


def test_token_entropy_in_chunks(monkeypatch):
    monkeypatch.setitem(moe_bias_head._ENTROPY_CHUNK_ELEMENTS, "cpu", 256)  # 2 rows of 100 per chunk
    logits = torch.randn(7, 100, generator=torch.Generator().manual_seed(0)) * 3
    torch.testing.assert_close(moe_bias_head.token_entropy(logits), entropy(logits))


def test_apply_to_all_biases_every_token():
    model, handle, head = patched("olmoe", apply_to="all")
    randomise(head)
    batch = tiny_batch(model)
    with torch.no_grad():
        with moe_sft.moe_bias_disabled(model):
            base = model(**batch).logits
        assert (model(**batch).logits != base).any(-1).all()
    handle.revert()


def test_threshold_running_quantile_updates_only_in_training():
    model, handle, head = patched("qwen2_moe", apply_to="top_entropy", rho=0.25, threshold_momentum=0.5)
    b1, b2 = tiny_batch(model, seed=1), tiny_batch(model, seed=2)
    b2["attention_mask"][0, 6:] = 0  # padding does not enter the estimate

    def base_entropy(batch):
        with torch.no_grad(), moe_sft.moe_bias_disabled(model):
            return entropy(model(**batch).logits)

    model.train()
    e1, e2 = base_entropy(b1), base_entropy(b2)
    assert head.threshold_updates.item() == 0  # no-grad and disabled forwards do not update
    model(**b1)
    q1 = torch.quantile(e1.flatten(), 0.75)
    torch.testing.assert_close(head.entropy_threshold, q1)
    model(**b2)
    q2 = torch.quantile(e2[b2["attention_mask"].bool()], 0.75)
    torch.testing.assert_close(head.entropy_threshold, 0.5 * q1 + 0.5 * q2)
    assert head.threshold_updates.item() == 2
    saved = head.entropy_threshold.clone()
    model.eval()
    model(**b1)  # eval forward with grad: no update
    with torch.no_grad():
        model.train()
        model(**b1)  # training mode without grad: no update
    assert torch.equal(head.entropy_threshold, saved) and head.threshold_updates.item() == 2
    handle.revert()


def test_batch_size_one_inference_uses_stored_threshold():
    model, handle, head = patched("qwen3_moe", apply_to="top_entropy")
    randomise(head)
    batch = tiny_batch(model, batch=4, seq=9)
    model.train()
    model(**batch)  # estimate the threshold
    thr = head.entropy_threshold.clone()
    model.eval()
    with torch.no_grad():
        for i in range(4):
            single = {k: v[i : i + 1] for k, v in batch.items()}
            with moe_sft.moe_bias_disabled(model):
                ent = entropy(model(**single).logits)[0]
            model(**single)
            assert torch.equal(head.last_applied, ent >= thr)
    assert torch.equal(head.entropy_threshold, thr)
    handle.revert()


def test_threshold_and_head_saved_and_restored(tmp_path):
    model, handle, head = patched("olmoe", apply_to="top_entropy")
    randomise(head)
    model.train()
    model(**tiny_batch(model, seed=3))
    assert head.entropy_threshold.item() > 0 and head.threshold_updates.item() == 1
    model.eval()
    batch = tiny_batch(model)
    with torch.no_grad():
        ref = model(**batch).logits
    moe_sft.save_pretrained(model, tmp_path / "ckpt")
    loaded = moe_sft.from_pretrained(tmp_path / "ckpt").eval()
    new = moe_sft.get_moe_bias_layer(loaded)
    for key, value in head.state_dict().items():
        assert torch.equal(new.state_dict()[key], value), key
    with torch.no_grad():
        assert torch.equal(loaded(**batch).logits, ref)
    handle.revert()


# ---- 4. environment overrides -------------------------------------------------------------


def test_env_enables_head_with_defaults_and_overrides(monkeypatch):
    monkeypatch.setenv("MOE_BIAS_ENABLED", "1")
    monkeypatch.setenv("MOE_BIAS_NUM_EXPERTS", "5")
    monkeypatch.setenv("MOE_BIAS_TOP_K", "3")
    monkeypatch.setenv("MOE_BIAS_LOAD_BALANCE_WEIGHT", "0.5")
    model = tiny_model("olmoe")
    handle = moe_sft.patch_model(model, MoESFTConfig())
    head = moe_sft.get_moe_bias_layer(model)
    expected = MoEBiasHeadConfig(num_experts=5, top_k=3, load_balance_weight=0.5)
    assert head.config == expected and handle.config.moe_bias_head == expected  # what checkpoints save
    assert head.bias.shape == (5, model.config.vocab_size) and head.gate.weight.shape == (5, model.config.hidden_size)
    handle.revert()


def test_env_overrides_configured_block(monkeypatch):
    monkeypatch.setenv("MOE_BIAS_TOP_K", "4")
    model, handle, head = patched("qwen2_moe", num_experts=8, top_k=2, apply_to="top_entropy")
    assert head.config == MoEBiasHeadConfig(num_experts=8, top_k=4, apply_to="top_entropy")
    handle.revert()


def test_env_alone_does_not_enable(monkeypatch):
    monkeypatch.setenv("MOE_BIAS_NUM_EXPERTS", "4")
    model = tiny_model("olmoe")
    handle = moe_sft.patch_model(model, MoESFTConfig())
    assert moe_sft.get_moe_bias_layer(model) is None
    handle.revert()


@pytest.mark.parametrize("value", ["0", "false", "OFF"])
def test_env_disables_configured_head(monkeypatch, value):
    monkeypatch.setenv("MOE_BIAS_ENABLED", value)
    model = tiny_model("olmoe")
    handle = moe_sft.patch_model(model, MoESFTConfig(moe_bias_head=MoEBiasHeadConfig()))
    assert moe_sft.get_moe_bias_layer(model) is None and handle.config.moe_bias_head is None
    handle.revert()


@pytest.mark.parametrize(
    "env, message",
    [
        ({"MOE_BIAS_TOP_K": "abc"}, "MOE_BIAS_TOP_K='abc' is not a valid int"),
        ({"MOE_BIAS_NUM_EXPERTS": "2.5"}, "MOE_BIAS_NUM_EXPERTS='2.5' is not a valid int"),
        ({"MOE_BIAS_LOAD_BALANCE_WEIGHT": "x"}, "MOE_BIAS_LOAD_BALANCE_WEIGHT='x' is not a valid float"),
        ({"MOE_BIAS_ENABLED": "maybe"}, "MOE_BIAS_ENABLED='maybe'"),
        ({"MOE_BIAS_TOP_K": "5", "MOE_BIAS_NUM_EXPERTS": "4"}, "top_k=5 with num_experts=4"),
        ({"MOE_BIAS_LOAD_BALANCE_WEIGHT": "-1"}, "load_balance_weight=-1.0"),
    ],
)
def test_env_malformed_is_clear_error_before_patching(monkeypatch, env, message):
    monkeypatch.setenv("MOE_BIAS_ENABLED", "1")
    for var, value in env.items():
        monkeypatch.setenv(var, value)
    model = tiny_model("qwen3_moe")
    stock_class = type(model.model.layers[0].mlp)
    with pytest.raises(ConfigError, match=message.replace("(", r"\(").replace(".", r"\.")):
        moe_sft.patch_model(model, MoESFTConfig())
    assert moe_sft.get_handle(model) is None and type(model.model.layers[0].mlp) is stock_class
    assert moe_sft.get_moe_bias_layer(model) is None


@pytest.mark.parametrize(
    "block, message",
    [
        ({"top_k": 17}, "top_k=17 with num_experts=16"),
        ({"num_experts": 0}, "num_experts=0"),
        ({"rho": 0.0}, "rho=0.0"),
        ({"threshold_momentum": 1.0}, "threshold_momentum=1.0"),
        ({"apply_to": "some"}, "'some' is not one of 'all', 'top_entropy'"),
        ({"topk": 2}, "unknown config key"),
    ],
)
def test_config_validation(block, message):
    with pytest.raises(ConfigError, match=message):
        MoESFTConfig.from_dict({"moe_bias_head": block})


# ---- 5. generate() ----------------------------------------------------------------------------


@pytest.mark.parametrize("apply_to", ["all", "top_entropy"])
@pytest.mark.parametrize("family", CORE_FAMILIES)
def test_generate_matches_hand_greedy_decoding(family, apply_to):
    model, handle, head = patched(family, apply_to=apply_to)
    randomise(head)
    prompt = tiny_batch(model, batch=1, seq=5)["input_ids"]
    steps = 8
    if apply_to == "top_entropy":
        with torch.no_grad():
            head.entropy_threshold.fill_(entropy(model(prompt).logits).median())
    model.generation_config.eos_token_id = None  # always `steps` new tokens
    generated = model.generate(prompt, max_new_tokens=steps, do_sample=False)  # KV cache on
    with moe_sft.moe_bias_disabled(model):
        base = model.generate(prompt, max_new_tokens=steps, do_sample=False)
    seq = prompt
    with torch.no_grad():
        for _ in range(steps):  # no cache: the full sequence each step, then apply_moe_bias
            with moe_sft.moe_bias_disabled(model):
                out = model(seq, output_hidden_states=True)
            logits = moe_sft.apply_moe_bias(out, model).logits
            seq = torch.cat([seq, logits[:, -1].argmax(-1, keepdim=True)], dim=1)
    assert torch.equal(generated, seq)
    assert not torch.equal(generated, base)  # the bias matters, so the comparison can fail
    handle.revert()


def test_apply_moe_bias_is_idempotent_and_checks_input():
    model, handle, head = patched("qwen3_moe")
    randomise(head)
    batch = tiny_batch(model)
    with torch.no_grad():
        out = model(**batch, output_hidden_states=True)
        hooked = out.logits.clone()
        assert torch.equal(moe_sft.apply_moe_bias(out, model).logits, hooked)  # no double bias
        kept = model(batch["input_ids"], output_hidden_states=True, logits_to_keep=3)
        # A different matmul shape (3 rows, not 12): equal up to fp32 rounding.
        torch.testing.assert_close(moe_sft.apply_moe_bias(kept, model).logits, hooked[:, -3:], atol=1e-6, rtol=1e-6)
        with pytest.raises(ValueError, match="output_hidden_states=True"):
            moe_sft.apply_moe_bias(model(**batch), model)
    handle.revert()
    with pytest.raises(ValueError, match="has no MoE-Bias head"):
        moe_sft.apply_moe_bias(out, model)


# ---- 6. adapter mode ----------------------------------------------------------------------------


def test_adapter_mode_trains_only_head_and_reloads_identically(tmp_path):
    model, handle, head = patched("deepseek_v3", freeze_base=True, apply_to="top_entropy", rho=0.5)
    base_state = {k: v.clone() for k, v in model.state_dict().items() if not k.startswith("moe_bias_head.")}
    head_before = {k: v.clone() for k, v in head.state_dict().items()}
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    assert sorted(trainable) == ["moe_bias_head.bias", "moe_bias_head.gate.weight"]
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    model.train()
    for step in range(3):
        model(**tiny_batch(model, seed=step)).loss.backward()
        opt.step()
        opt.zero_grad()
    for k, v in model.state_dict().items():
        if k in base_state:
            assert torch.equal(v, base_state[k]), k
    for k, v in head.state_dict().items():
        assert not torch.equal(v, head_before[k]), k  # gate, bias, threshold, update count

    moe_sft.save_moe_bias_adapter(model, tmp_path / "adapter")
    files = sorted(p.name for p in (tmp_path / "adapter").iterdir())
    assert files == sorted([ADAPTER_CONFIG_NAME, ADAPTER_WEIGHTS_NAME])
    model.eval()
    batch = tiny_batch(model, seed=9)
    with torch.no_grad():
        ref = model(**batch).logits
    fresh = tiny_model("deepseek_v3")  # the same base weights (same seed), never patched
    loaded = moe_sft.load_moe_bias_adapter(fresh, tmp_path / "adapter")
    assert moe_sft.get_handle(fresh).config.moe_bias_head == head.config
    for k, v in head.state_dict().items():
        assert torch.equal(loaded.state_dict()[k], v), k
    with torch.no_grad():
        assert torch.equal(fresh(**batch).logits, ref)
    handle.revert()
    moe_sft.get_handle(fresh).revert()
    assert all(p.requires_grad for p in model.parameters())


def test_adapter_onto_model_patched_with_other_settings(tmp_path, monkeypatch):
    model, handle, head = patched("olmoe")
    randomise(head)
    moe_sft.save_moe_bias_adapter(model, tmp_path / "adapter")
    other = tiny_model("olmoe")
    stock_keys = set(other.state_dict())
    other_handle = moe_sft.patch_model(other, MoESFTConfig.from_dict({"routing": {"disabled_experts": {0: [1]}}}))
    moe_sft.load_moe_bias_adapter(other, tmp_path / "adapter")
    assert other_handle.config.moe_bias_head == head.config and other_handle.config.routing is not None
    assert torch.equal(moe_sft.get_moe_bias_layer(other).bias, head.bias)
    other_handle.revert()
    assert moe_sft.get_moe_bias_layer(other) is None and set(other.state_dict()) == stock_keys

    monkeypatch.setenv("MOE_BIAS_NUM_EXPERTS", "4")
    with pytest.raises(ConfigError, match="unset them"):
        moe_sft.load_moe_bias_adapter(tiny_model("olmoe"), tmp_path / "adapter")
    monkeypatch.delenv("MOE_BIAS_NUM_EXPERTS")
    with pytest.raises(ConfigError, match="vocab_size=128"):
        moe_sft.load_moe_bias_adapter(tiny_model("olmoe", vocab_size=96), tmp_path / "adapter")
    with pytest.raises(FileNotFoundError, match="save_moe_bias_adapter"):
        moe_sft.load_moe_bias_adapter(tiny_model("olmoe"), tmp_path)
    with pytest.raises(FileExistsError):
        moe_sft.save_moe_bias_adapter(model, tmp_path / "adapter")
    handle.revert()


@pytest.mark.parametrize("other_rank_tokens", [10, 0])
def test_threshold_averages_batch_quantiles_over_ranks(monkeypatch, other_rank_tokens):
    """Data parallel: ranks all-reduce (quantile * has_tokens, has_tokens) before the EMA, so
    every rank folds in the same value; a rank without tokens does not count. The other rank
    is simulated by an all_reduce that adds its contribution."""
    other = torch.arange(float(other_rank_tokens)) + 10
    other_stats = torch.tensor([torch.quantile(other, 0.8).item(), 1.0]) if other_rank_tokens else torch.zeros(2)
    monkeypatch.setattr(torch.distributed, "is_initialized", lambda: True)
    monkeypatch.setattr(torch.distributed, "all_reduce", lambda t: t.add_(other_stats))
    cfg = MoEBiasHeadConfig(apply_to="top_entropy")
    head = MoEBiasHead(4, 16, cfg, init_std=0.1, dtype=torch.float32, device="cpu")
    head._update_threshold(torch.arange(10.0))
    q_here = torch.quantile(torch.arange(10.0), 0.8)
    expected = (q_here + other_stats[0]) / 2 if other_rank_tokens else q_here
    torch.testing.assert_close(head.entropy_threshold, expected)
    assert head.threshold_updates.item() == 1
