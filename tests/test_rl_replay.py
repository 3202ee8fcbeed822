"""Routing replay under GRPO (tiny patched models, CPU):
- the generation record is generate's routing of every token it fed (checked against one full
  fp32 forward of the same tokens) and its log-probs are those of generate's logits;
- `rollout`: every training forward routes exactly the recorded experts, for every token and
  layer, and at the first iteration the per-token importance ratio is exactly 1;
- a constructed mismatch (bf16 scoring, fp32 generation): without replay the training forward
  routes differently from generation and the logged mismatch is that fraction; with `rollout`
  the experts it uses are generation's (mismatch_replayed 0); `old_policy` replays the old-policy
  scoring forward's routing instead of generation's."""

from __future__ import annotations

import pytest
import torch
from test_rl_trainer import make_trainer, patched

from moe_sft.rl import GenerationRecorder, MoEGRPOTrainer
from moe_sft.rl.replay import UNRECORDED
from moe_sft.rl.trainer import GENERATED_KEY, REPLAY_KEY
from moe_sft.testing import tiny_tokenizer

# Many experts per layer: bf16 rounding flips some top-k choices on a few dozen tokens.
WIDE = dict(num_experts=32, num_experts_per_tok=8, num_hidden_layers=3)


@pytest.fixture(autouse=True)
def one_thread():
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def picks_of(handle, fn):
    """(B, S, L, k') routed picks of every patched layer in the forward `fn()` runs (an observer
    of its own, independent of moe_sft.rl's capture)."""
    calls = {m.layer_idx: [] for m in handle.layers}
    with handle.observing(lambda i, routing, x, block: calls[i].append(routing.index[:, : routing.num_routed].clone())):
        B, S = fn()
    return torch.stack([torch.cat(calls[m.layer_idx]).view(B, S, -1) for m in handle.layers], dim=2)


class Probe(MoEGRPOTrainer):
    """Keeps, per training forward: the batch, the routed picks the forward used, its log-probs."""

    def _compute_loss(self, model, inputs):
        ids = torch.cat([inputs["prompt_ids"], inputs["completion_ids"]], 1)
        seen = {"inputs": inputs}

        def run():
            seen["loss"] = super(Probe, self)._compute_loss(model, inputs)
            return ids.shape

        seen["used"] = picks_of(self.handle, run)
        seen["logps"] = self.training_logps
        self.seen.append(seen)
        return seen["loss"]

    def _get_per_token_logps_and_entropies(self, *args, **kwargs):
        out = super()._get_per_token_logps_and_entropies(*args, **kwargs)
        if torch.is_grad_enabled():  # the training forward (scoring forwards run without gradient)
            self.training_logps = out[0].detach()
        return out


class Bf16Scoring(Probe):
    """Scores (old-policy, training forwards) under bf16 autocast; generation stays fp32."""

    def _get_per_token_logps_and_entropies(self, *args, **kwargs):
        with torch.autocast("cpu", dtype=torch.bfloat16):
            return super()._get_per_token_logps_and_entropies(*args, **kwargs)


def run(tmp_path, cls, replay, shape=None, **grpo):
    model, handle = patched(**(shape or {}))
    trainer = make_trainer(model, tmp_path / "out", cls, replay=replay, **grpo)
    trainer.seen = []
    trainer.train()
    return trainer, model, handle


def test_generation_record_is_generates_routing_and_log_probs():
    model, handle = patched(**WIDE)
    tok = tiny_tokenizer()
    enc = tok(["<s>user: What is 2 + 3?</s>\n<s>assistant: ", "<s>user: 7 + 1?</s>\n<s>assistant: "], return_tensors="pt",
              padding=True, padding_side="left")  # fmt: skip
    recorder = GenerationRecorder(handle, temperature=0.7, logps=True)
    with recorder, torch.no_grad():
        out = model.generate(**enc, max_new_tokens=6, do_sample=True, temperature=0.7, top_k=0, output_logits=True,
                             return_dict_in_generate=True, output_router_logits=False)  # fmt: skip
    P = enc["input_ids"].shape[1]
    new = out.sequences[:, P:]
    rollout = recorder.result([row.tolist() for row in new])
    assert rollout.prompt_len == P and rollout.picks.shape == (2, P + new.shape[1] - 1, len(handle.layers), 8)
    # fp32: one full forward routes every fed token as generate did (left padding included)
    mask = torch.cat([enc["attention_mask"], torch.ones_like(new)], 1)
    with torch.no_grad():
        full = picks_of(handle, lambda: (model(input_ids=out.sequences, attention_mask=mask, output_router_logits=False), out.sequences.shape)[1])
    fed = mask[:, : rollout.picks.shape[1]].bool()
    assert torch.equal(rollout.picks.long().sort(-1).values[fed], full[:, : rollout.picks.shape[1]].sort(-1).values[fed])
    logits = torch.stack(out.logits, 1).float() / 0.7  # (B, C, V): what generate sampled from
    expected = torch.log_softmax(logits, -1).gather(-1, new[..., None]).squeeze(-1)
    torch.testing.assert_close(rollout.logps, expected, atol=1e-6, rtol=0)


def test_rollout_replay_routes_the_recorded_experts_and_the_first_ratio_is_exactly_one(tmp_path):
    # two iterations per generation: TRL scores the old policy, then trains twice on the batch
    trainer, model, handle = run(tmp_path, Probe, "rollout", max_steps=2, num_iterations=2, gradient_checkpointing=True)
    assert len(trainer.seen) == 2
    for seen in trainer.seen:
        inputs = seen["inputs"]
        # every token (prompt, completion, padding) and every layer: the recorded experts
        assert torch.equal(seen["used"], inputs[REPLAY_KEY].long())
        recorded = inputs[GENERATED_KEY][..., 0, 0] != UNRECORDED
        assert torch.equal(inputs[REPLAY_KEY][recorded], inputs[GENERATED_KEY][recorded])  # = generation's picks
    first, second = trainer.seen
    mask = first["inputs"]["completion_mask"].bool()
    assert torch.equal(first["logps"][mask], first["inputs"]["old_per_token_logps"][mask])  # ratio exp(0) = 1 exactly
    assert not torch.equal(second["logps"][mask], second["inputs"]["old_per_token_logps"][mask])  # after an update: not
    logged = trainer.state.log_history[0]
    assert (logged["ratio/old_min"], logged["ratio/old_max"]) == (1.0, 1.0)
    assert logged["routing/mismatch_replayed"] == 0.0
    assert logged["ratio/rollout_max"] - logged["ratio/rollout_min"] < 1e-4  # fp32: generate's log-probs


def _mismatch(seen, against) -> float:
    """Fraction of (completion token fed by generate, layer) whose routed set in the training
    forward differs from `against` (B, S, L, k')."""
    inputs = seen["inputs"]
    C = inputs["completion_ids"].shape[1]
    keep = torch.zeros(seen["used"].shape[:2], dtype=torch.bool)
    keep[:, -C:] = inputs["completion_mask"].bool()
    keep &= inputs[GENERATED_KEY][..., 0, 0] != UNRECORDED
    differs = (seen["used"].sort(-1).values != against.long().sort(-1).values).any(-1)  # (B, S, L)
    return differs[keep].float().mean().item()


def test_without_replay_the_mismatch_is_measured(tmp_path):
    trainer, *_ = run(tmp_path, Bf16Scoring, "none", WIDE, max_steps=1, max_completion_length=12)
    (seen,) = trainer.seen
    assert REPLAY_KEY not in seen["inputs"]
    direct = _mismatch(seen, seen["inputs"][GENERATED_KEY])
    assert direct > 0  # bf16 scoring routes some (token, layer) differently from fp32 generation
    logged = trainer.state.log_history[0]
    assert logged["routing/mismatch"] == pytest.approx(direct) == pytest.approx(logged["routing/mismatch_replayed"])
    assert logged["routing/mismatch_tokens"] >= direct


def test_rollout_replay_removes_the_constructed_mismatch(tmp_path):
    trainer, *_ = run(tmp_path, Bf16Scoring, "rollout", WIDE, max_steps=1, max_completion_length=12)
    (seen,) = trainer.seen
    inputs = seen["inputs"]
    assert torch.equal(seen["used"], inputs[REPLAY_KEY].long())
    assert _mismatch(seen, inputs[GENERATED_KEY]) == 0.0
    logged = trainer.state.log_history[0]
    assert logged["routing/mismatch_replayed"] == 0.0
    assert logged["routing/mismatch"] > 0  # what the bf16 router would have picked differs


def test_old_policy_replays_the_old_policy_forward(tmp_path):
    trainer, *_ = run(tmp_path, Bf16Scoring, "old_policy", WIDE, max_steps=1, max_completion_length=12)
    (seen,) = trainer.seen
    inputs = seen["inputs"]
    assert torch.equal(seen["used"], inputs[REPLAY_KEY].long())  # the training forward replays the record ...
    assert _mismatch(seen, inputs[GENERATED_KEY]) > 0  # ... of the (bf16) old-policy forward, not generation's
    mask = inputs["completion_mask"].bool()
    # TRL would skip the old-policy forward here (one iteration): it ran, recording, and its log-probs are exact
    assert torch.equal(seen["logps"][mask], inputs["old_per_token_logps"][mask])
