"""MoEGRPOTrainer on tiny patched models (CPU, fp32, a few GRPO steps):
- the policy that is scored is the policy that generated: for every method, the per-token
  log-probs of the trainer's first training forward equal those of the logits `generate`
  sampled from (temperature included), a non-zero MoE-Bias head among them, and the head's
  parameters change after a step;
- the condenser's aux loss stays off under GRPO (and a TRL coefficient is refused), its bias
  moves once per optimizer step;
- the forking-token mask keeps exactly the top-rho completion tokens by entropy (against a
  direct computation from the model's logits) and the loss has no gradient on the others."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from datasets import Dataset
from trl import GRPOConfig

import moe_sft
from moe_sft import ConfigError, MoESFTConfig
from moe_sft.methods.condenser import CondenserConfig, CondensersConfig, RouterBiasConfig
from moe_sft.methods.moe_bias_head import MoEBiasHeadConfig, get_moe_bias_layer
from moe_sft.rl import MoEGRPOTrainer
from moe_sft.testing import tiny_model, tiny_tokenizer

TEMPERATURE = 0.7
LOGP_ATOL = 2e-5  # KV-cache decoding vs one full forward, fp32


@pytest.fixture(autouse=True)
def one_thread():
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def prompts(n: int = 8) -> Dataset:
    """Prompts of different lengths, so generation runs on left-padded batches (where
    transformers' router aux loss fails on cached decoding steps: generation must run without it)."""
    rows = [(i % 10, (37 * i + 5) % 100) for i in range(n)]
    return Dataset.from_list([{"prompt": f"<s>user: What is {a} + {b}?</s>\n<s>assistant: ", "answer": str(a + b)} for a, b in rows])


def digit_share(completions, **kwargs) -> list[float]:
    """A reward that varies between the samples of a random model (so advantages are not 0)."""
    return [sum(c.isdigit() for c in text) / max(len(text), 1) for text in completions]


def make_trainer(model, out, cls=MoEGRPOTrainer, *, replay="rollout", metrics=True, dataset=None, **grpo):
    settings = dict(per_device_train_batch_size=4, num_generations=4, max_completion_length=8, max_steps=2, learning_rate=1e-2,
                    temperature=TEMPERATURE, report_to="none", logging_steps=1, use_cpu=True, save_strategy="no",
                    gradient_checkpointing=False, bf16=False, seed=0)  # fmt: skip
    args = GRPOConfig(output_dir=str(out), **{**settings, **grpo})  # fp32: GRPOConfig's own default is bf16 autocast
    return cls(model=model, reward_funcs=[digit_share], args=args, train_dataset=dataset or prompts(), processing_class=tiny_tokenizer(),
               routing_replay=replay, routing_metrics=metrics)  # fmt: skip


def patched(config: MoESFTConfig | None = None, **shape):
    model = tiny_model("qwen3_moe", experts_implementation="eager", **shape)
    assert model.config.output_router_logits  # the tiny config asks for router logits (and the aux loss)
    return model, moe_sft.patch_model(model, config or MoESFTConfig())


class GenerateLogits(MoEGRPOTrainer):
    """Keeps the logits `generate` returned for the tokens it sampled (output_logits: the raw
    logits, before temperature), and the log-probs of the first training forward."""

    def _generate_single_turn(self, *args, **kwargs):
        model = self.handle.model
        original = model.generate

        def generate(*a, **k):
            out = original(*a, **k, output_logits=True, return_dict_in_generate=True)
            steps = torch.stack(out.logits, dim=1).float()  # (B, C_gen, V)
            new = out.sequences[:, -steps.shape[1] :]
            logp = torch.log_softmax(steps / self.args.temperature, -1).gather(-1, new[..., None]).squeeze(-1)
            self.generated.update({tuple(seq.tolist()): lp for seq, lp in zip(out.sequences, logp)})
            return out.sequences

        model.generate = generate
        try:
            return super()._generate_single_turn(*args, **kwargs)
        finally:
            del model.generate

    def _compute_loss(self, model, inputs):
        loss = super()._compute_loss(model, inputs)
        if not hasattr(self, "scored"):
            self.scored = (inputs, self.last_logps)
        return loss

    def _get_per_token_logps_and_entropies(self, *args, **kwargs):
        out = super()._get_per_token_logps_and_entropies(*args, **kwargs)
        self.last_logps = out[0].detach()
        return out


def _condenser_phase2(model):
    handle = moe_sft.patch_model(model, MoESFTConfig(condenser=CondenserConfig(
        bias=RouterBiasConfig(gamma=1e-2), condensers=CondensersConfig(num=2, experts={0: [6, 7], 1: [0, 1]}))))  # fmt: skip
    return handle


def _with_method(name: str, tmp_path):
    """A tiny model patched with `name`, its added state made non-zero (so that a head or bias
    the scoring bypassed would show)."""
    model = tiny_model("qwen3_moe", experts_implementation="eager")
    g = torch.Generator().manual_seed(1)
    if name == "condenser_phase2":
        handle = _condenser_phase2(model)
    else:
        blocks = {
            "off": {},
            "condenser": {"condenser": CondenserConfig(bias=RouterBiasConfig(gamma=1e-2))},
            "frozen_router": {"frozen_router": moe_sft.FrozenRouterConfig()},
            "densemixer": {"densemixer": moe_sft.DenseMixerConfig()},
            "moe_bias_head": {"moe_bias_head": MoEBiasHeadConfig(num_experts=4, top_k=2)},
            "esft": {"esft": moe_sft.ESFTConfig(selection_file=str(_esft_selection(tmp_path)))},
        }[name]
        handle = moe_sft.patch_model(model, MoESFTConfig(**blocks))
    with torch.no_grad():
        for m in handle.layers:
            if m.controls.logit_bias is not None:
                m.controls.logit_bias.copy_(torch.randn(m.controls.logit_bias.shape, generator=g))
        head = get_moe_bias_layer(model)
        if head is not None:
            head.bias.copy_(torch.randn(head.bias.shape, generator=g))
    return model, handle


def _esft_selection(tmp_path):
    from moe_sft.methods.esft import save_selection

    path = tmp_path / "selection.json"
    save_selection(path, {0: [1, 2], 1: [3]}, score="token")
    return path


@pytest.mark.parametrize("method", ["off", "condenser", "condenser_phase2", "frozen_router", "densemixer", "esft", "moe_bias_head", "lora"])
def test_scored_policy_is_the_generating_policy(method, tmp_path):
    if method == "lora":
        from moe_sft.methods.lora import LoraBlockConfig, get_peft_model

        model = tiny_model("qwen3_moe", experts_implementation="eager")
        moe_sft.patch_model(model, MoESFTConfig(lora=LoraBlockConfig(r=4, alpha=8)))
        policy = get_peft_model(model)
        with torch.no_grad():  # LoRA B starts at 0: make the adapter change the logits
            for name, p in policy.named_parameters():
                if "lora_B" in name:
                    p.normal_(std=0.05)
    else:
        policy, _ = _with_method(method, tmp_path)
    trainer = make_trainer(policy, tmp_path / "out", GenerateLogits, max_steps=1)
    trainer.generated = {}
    trainer.train()
    inputs, logps = trainer.scored
    ids = torch.cat([inputs["prompt_ids"], inputs["completion_ids"]], 1)
    mask = inputs["completion_mask"].bool()
    for row in range(ids.shape[0]):
        # TRL pads prompts (left) and completions (right) with the pad id as generate does, and
        # shuffles rows: find the row by its tokens
        gen = next(v for k, v in trainer.generated.items() if list(k[: ids.shape[1]]) == ids[row].tolist())
        n = int(mask[row].sum())
        torch.testing.assert_close(logps[row, :n], gen[:n].to(logps.dtype), atol=LOGP_ATOL, rtol=0)


def test_moe_bias_head_reads_trl_temperature_under_mixed_precision(tmp_path):
    """TRL's GRPOConfig defaults to bf16: accelerate then wraps `model.forward` (autocast,
    convert_outputs_to_fp32) around the fused forward TRL installed; the MoE-Bias head still
    reads TRL's temperature from that forward's closure."""
    from moe_sft.integrations.trl import fused_settings

    model, _ = _with_method("moe_bias_head", tmp_path)
    trainer = make_trainer(model, tmp_path / "out", bf16=True)
    trainer.accelerator.prepare(trainer.model)  # what Trainer.train does first
    assert fused_settings(model)["temperature"] == TEMPERATURE


def test_moe_bias_head_trains_under_grpo(tmp_path):
    model, handle = _with_method("moe_bias_head", tmp_path)
    head = get_moe_bias_layer(model)
    before = {k: v.detach().clone() for k, v in head.named_parameters()}
    trainer = make_trainer(model, tmp_path / "out", max_steps=1)
    trainer.train()
    assert model.config.output_router_logits  # off during generation only
    assert trainer.state.log_history[0]["frac_reward_zero_std"] < 1  # some group had a signal
    for name, p in head.named_parameters():
        assert not torch.equal(p.detach(), before[name]), name


def test_condenser_aux_loss_stays_off_and_bias_moves_once_per_step(tmp_path):
    gamma, steps = 1e-2, 2
    model, handle = patched(MoESFTConfig(condenser=CondenserConfig(bias=RouterBiasConfig(gamma=gamma))))
    trainer = make_trainer(model, tmp_path / "out", max_steps=steps, num_iterations=2, gradient_accumulation_steps=2,
                           per_device_train_batch_size=2, num_generations=2)  # fmt: skip
    assert trainer.router_aux_loss_coef == 0 and not trainer.aux_loss_enabled  # the config asks for router logits, TRL adds no aux loss
    trainer.train()
    assert all("aux_loss" not in h for h in trainer.state.log_history)
    for m in handle.layers:
        b = m.controls.logit_bias
        # `steps` sign updates of +-gamma each; the generation, old-policy and the two training forwards of
        # each step must not update it
        assert b.abs().max().item() == pytest.approx(steps * gamma) and b.abs().sum() > 0, b
        assert torch.allclose(b / gamma, (b / gamma).round(), atol=1e-4)

    model2, _ = patched(MoESFTConfig(condenser=CondenserConfig()))
    with pytest.raises(ConfigError, match=r"GRPOConfig\.router_aux_loss_coef = 0\.01 with condenser: the method is auxiliary-loss free"):
        make_trainer(model2, tmp_path / "out2", router_aux_loss_coef=0.01)


class EntropyProbe(MoEGRPOTrainer):
    """Keeps each training forward's inputs, TRL's entropy mask and the per-token log-probs
    (with their gradient after backward)."""

    seen: list

    def get_high_entropy_mask(self, entropies, mask, threshold):
        keep = super().get_high_entropy_mask(entropies, mask, threshold)
        self.seen[-1]["keep"] = keep
        return keep

    def _compute_loss(self, model, inputs):
        ids = torch.cat([inputs["prompt_ids"], inputs["completion_ids"]], 1)
        attn = torch.cat([inputs["prompt_mask"], inputs["completion_mask"]], 1)
        C = inputs["completion_ids"].shape[1]
        with torch.no_grad():  # direct: entropy of softmax(logits / T) predicting each completion token
            logits = self.handle.model(input_ids=ids, attention_mask=attn, output_router_logits=False).logits[:, -C - 1 : -1]
            logp = torch.log_softmax(logits.float() / self.args.temperature, -1)
        self.seen.append({"inputs": inputs, "entropy": -(logp.exp() * logp).sum(-1)})  # (B, C)
        return super()._compute_loss(model, inputs)

    def _get_per_token_logps_and_entropies(self, *args, **kwargs):
        logps, entropies, aux = super()._get_per_token_logps_and_entropies(*args, **kwargs)
        if torch.is_grad_enabled() and logps.requires_grad:
            logps.retain_grad()
            self.seen[-1]["logps"] = logps
        return logps, entropies, aux


def test_forking_token_mask_keeps_the_top_rho_tokens_and_the_loss_ignores_the_rest(tmp_path):
    rho = 0.2
    model, handle = patched()
    trainer = make_trainer(model, tmp_path / "out", EntropyProbe, replay="none", max_steps=1, top_entropy_quantile=rho,
                           max_completion_length=12, per_device_train_batch_size=8)  # fmt: skip
    trainer.seen = []
    trainer.train()
    (step,) = trainer.seen
    inputs, keep, logps, entropy = step["inputs"], step["keep"], step["logps"], step["entropy"]
    valid = inputs["completion_mask"].bool()
    threshold = np.quantile(entropy[valid].numpy(), 1 - rho)
    direct = (entropy >= torch.tensor(threshold)) & valid
    # float noise between the two entropy computations decides only for the (at most two) tokens
    # next to the interpolated quantile
    near = valid & ((entropy - threshold).abs() < 1e-5)
    assert torch.equal(keep[~near], direct[~near]) and near.sum() <= 2
    assert abs(keep.sum().item() - rho * valid.sum().item()) <= 1
    grad = logps.grad
    assert (grad[~keep] == 0).all()  # dropped (and padding) tokens carry no gradient
    signal = inputs["advantages"] != 0  # (B,) rows whose group rewards differ
    assert signal.any() and (grad[keep & signal[:, None]] != 0).all()  # kept tokens do
    logged = trainer.state.log_history[0]
    assert logged["entropy_mask/kept_fraction"] == pytest.approx(keep.sum().item() / valid.sum().item())
    assert logged["entropy_mask/kept_entropy"] > logged["entropy_mask/dropped_entropy"]
