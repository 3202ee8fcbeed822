"""`MoEGRPOTrainer`: TRL's GRPOTrainer for moe_sft-patched MoE models.

    trainer = MoEGRPOTrainer(model=patched_model, reward_funcs=[...], args=GRPOConfig(...),
                             train_dataset=prompts, processing_class=tokenizer, routing_replay="rollout")

What it adds, at TRL's override points (the GRPO algorithm, its loss and the forking-token mask
`top_entropy_quantile` stay TRL's):
- generation with `output_router_logits` off (transformers' aux-loss code fails on cached
  decoding steps of left-padded batches);
- routing replay (`moe_sft.rl.replay`), `routing_replay`:
    rollout     `_generate_single_turn` records every generated token's routed experts in
                generate (prefill and each decode step); every scoring and training forward
                of that batch replays them
    old_policy  the old-policy scoring forward records them (run here when TRL would skip
                it, i.e. num_iterations = 1 and steps aligned); the training forwards replay them
    none        every forward routes by itself
  The record travels with the batch as the tensor `routing_replay` (B, S, L, k'), so TRL's
  shuffling and splitting of the generation batch keep it aligned with its rows; it is set on
  the layers before each forward and kept until the backward is done (activation-checkpoint
  recomputes replay the same experts);
- metrics, with `routing_metrics` (every training forward, logged with TRL's own):
    routing/mismatch           fraction of (completion token, MoE layer) whose routed set, as the
                               training forward's router picks it, differs from generation's
    routing/mismatch_replayed  the same for the set the forward actually used (0 under rollout replay)
    routing/mismatch_tokens    fraction of completion tokens with such a difference in some layer
    ratio/rollout_{mean,std,min,max}  pi_theta / pi_generate per completion token
    ratio/old_{mean,std,min,max}      pi_theta / pi_old (TRL's importance ratio), when TRL has old log-probs
    entropy_mask/{kept_fraction,kept_entropy,dropped_entropy}  the forking-token mask's effect
  and the generation log-probs as `sampling_per_token_logps` (which TRL's off-policy mask reads);
- `moe_sft.MoESFTCallback` (per-step method work such as the condenser's bias update, expert
  load, aux-loss checks) when the callbacks do not include one.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging

import torch
from trl import GRPOTrainer

from ..config import ConfigError
from ..integrations.hf_trainer import MoESFTCallback
from ..patching import find_handle
from .replay import UNRECORDED, GenerationRecorder, Rollout, RoutingCapture, align, set_replay

logger = logging.getLogger(__name__)

REPLAY_MODES = ("none", "old_policy", "rollout")
REPLAY_KEY = "routing_replay"  # (B, S, L, k') int16: the picks the training forwards replay
GENERATED_KEY = "routing_generated"  # (B, S, L, k') int16: generation's picks (UNRECORDED where none)
SAMPLING_KEY = "sampling_per_token_logps"  # (B, C) fp32: TRL's name for the behaviour policy's log-probs


@dataclasses.dataclass
class _Scoring:
    """Routing and measurement of the forwards scoring one batch.

    rollout    the generation record of the batch (scoring forwards inside generation only)
    replay     (B, S, L, k') picks to replay, or None
    record     old_policy: the next forward of the policy records its picks as `replay`
    generated  (B, S, L, k') generation's picks, to measure against (training forwards)
    sampling   (B, C) generation log-probs; old (B, C) old-policy log-probs (training forwards)
    measure    log the routing and ratio metrics for these forwards
    """

    rollout: Rollout | None = None
    replay: torch.Tensor | None = None
    record: bool = False
    generated: torch.Tensor | None = None
    sampling: torch.Tensor | None = None
    old: torch.Tensor | None = None
    measure: bool = False

    def replay_picks(self, seq_len: int, completion_len: int, from_rollout: bool) -> torch.Tensor | None:
        """The picks to replay for a (B, seq_len) scoring input whose last completion_len
        positions are the completion; a rollout record is aligned to it on first use."""
        if self.replay is None and from_rollout and self.rollout is not None:
            prompt_len = seq_len - completion_len
            if prompt_len != self.rollout.prompt_len:
                raise RuntimeError(
                    f"routing replay: generate saw prompts {self.rollout.prompt_len} tokens wide, the scoring forward "
                    f"{prompt_len}; the two must pad prompts alike"
                )
            self.replay = align(self.rollout.picks, prompt_len, seq_len, fill="copy")
        if self.replay is not None and self.replay.shape[1] != seq_len:
            raise RuntimeError(f"routing replay: recorded {self.replay.shape[1]} positions, the forward has {seq_len}")
        return self.replay


@contextlib.contextmanager
def _router_logits_off(model):
    """generate without router logits (and so without transformers' aux loss)."""
    config = model.config.get_text_config()
    before = getattr(config, "output_router_logits", False)
    config.output_router_logits = False
    try:
        yield
    finally:
        config.output_router_logits = before


class MoEGRPOTrainer(GRPOTrainer):
    """GRPOTrainer with routing replay and MoE metrics; every other argument is GRPOTrainer's."""

    def __init__(self, model, reward_funcs=None, args=None, *, routing_replay: str = "rollout", routing_metrics: bool = True,
                 callbacks=None, **kwargs):  # fmt: skip
        if routing_replay not in REPLAY_MODES:
            raise ConfigError(f"routing_replay={routing_replay!r}; choose one of {', '.join(REPLAY_MODES)}")
        handle = find_handle(model)
        if handle is None:
            raise ConfigError(
                f"MoEGRPOTrainer: {type(model).__name__} is not patched by moe_sft; patch it first (moe_sft.patch_model, "
                "moe_sft.from_pretrained), every method off gives the stock model"
            )
        callbacks = list(callbacks or [])
        if not any(isinstance(cb, MoESFTCallback) for cb in callbacks):
            callbacks.insert(0, MoESFTCallback())
        super().__init__(model, reward_funcs, args, callbacks=callbacks, **kwargs)
        if routing_replay == "rollout" and (self.use_vllm or self.use_transformers_continuous_batching or self.rollout_func or self.tools):
            raise ConfigError(
                "routing_replay=rollout records routing in one transformers generate call per batch; vLLM, continuous "
                "batching, rollout_func and tool calling generate otherwise. Use routing_replay='old_policy' or 'none'"
            )
        self.handle = handle
        self.routing_replay = routing_replay
        self.routing_metrics = routing_metrics
        self._scoring: _Scoring | None = None
        logger.info("moe_sft: GRPO on %d MoE layers, routing_replay=%s, routing metrics %s", len(handle.layers), routing_replay,
                    "on" if routing_metrics else "off")  # fmt: skip

    # ---- generation --------------------------------------------------------------------------
    def _generate_single_turn(self, prompt_ids, images, multimodal_fields, num_generations, has_tool_images=False):
        set_replay(self.handle, None)  # generation routes by itself
        recording = self.routing_replay == "rollout" or self.routing_metrics
        recorder = GenerationRecorder(self.handle, temperature=self.temperature, logps=self.routing_metrics)
        with _router_logits_off(self.handle.model), recorder if recording else contextlib.nullcontext():
            completion_ids, logprobs = super()._generate_single_turn(prompt_ids, images, multimodal_fields, num_generations, has_tool_images)
        # The scoring forwards of this batch (old policy, reference) follow inside TRL's
        # _generate_and_score_completions; old_policy records in the first, if TRL runs it.
        self._scoring = _Scoring(rollout=recorder.result(completion_ids) if recording else None,
                                 record=self.routing_replay == "old_policy" and self._trl_scores_old_policy())  # fmt: skip
        return completion_ids, logprobs

    def _trl_scores_old_policy(self) -> bool:
        """Whether TRL's _generate_and_score_completions computes old-policy log-probs (its own
        condition): generation not aligned with optimizer steps, or vLLM's sampling correction."""
        generate_every = self.args.steps_per_generation * self.num_iterations
        return self.args.gradient_accumulation_steps % generate_every != 0 or (self.use_vllm and self.vllm_importance_sampling_correction)

    def _generate_and_score_completions(self, inputs):
        try:
            output = super()._generate_and_score_completions(inputs)
            if self._scoring is not None:
                self._attach_routing(output, self._scoring)
            return output
        finally:
            self._scoring = None

    def _attach_routing(self, output: dict, scoring: _Scoring) -> None:
        """Add the batch's replay picks, generation picks and generation log-probs to TRL's
        batch dict (batch-first tensors, split and shuffled with it)."""
        ids = torch.cat([output["prompt_ids"], output["completion_ids"]], dim=1)  # (B, S)
        mask = torch.cat([output["prompt_mask"], output["completion_mask"]], dim=1)
        S, C = ids.shape[1], output["completion_ids"].shape[1]
        if self.routing_replay == "old_policy" and scoring.replay is None:  # TRL ran no old-policy forward: run it, recording
            scoring.record = True
            size = self.args.per_device_train_batch_size if self.model.training else self.args.per_device_eval_batch_size
            with torch.no_grad():
                output["old_per_token_logps"] = self._get_per_token_logps_and_entropies(self.model, ids, mask, C, batch_size=size)[0]
        replay = scoring.replay_picks(S, C, from_rollout=self.routing_replay == "rollout")
        if replay is not None:
            output[REPLAY_KEY] = replay
        if self.routing_metrics and scoring.rollout is not None:
            output[GENERATED_KEY] = align(scoring.rollout.picks, scoring.rollout.prompt_len, S, fill="unrecorded")
            logps = scoring.rollout.logps[:, :C]  # (B, C_gen) -> (B, C): pad with 0 where TRL pads further
            output[SAMPLING_KEY] = torch.nn.functional.pad(logps, (0, C - logps.shape[1]))

    # ---- scoring and training forwards -------------------------------------------------------
    def _compute_loss(self, model, inputs):
        self._scoring = _Scoring(replay=inputs.get(REPLAY_KEY), generated=inputs.get(GENERATED_KEY), sampling=inputs.get(SAMPLING_KEY),
                                 old=inputs.get("old_per_token_logps"), measure=self.routing_metrics)  # fmt: skip
        try:
            return super()._compute_loss(model, inputs)
        finally:
            self._scoring = None

    def training_step(self, *args, **kwargs):
        try:
            return super().training_step(*args, **kwargs)
        finally:
            set_replay(self.handle, None)  # the backward (and its recomputes) is done

    def _get_per_token_logps_and_entropies(self, model, input_ids, attention_mask, logits_to_keep, batch_size=None,
                                           compute_entropy=False, compute_aux_loss=False, **multimodal):  # fmt: skip
        """TRL's scoring forward, chunk by chunk, with this batch's picks set on the layers
        (replay), captured (old_policy record) or measured against generation's."""
        scoring = self._scoring
        if scoring is None or find_handle(model) is not self.handle:  # e.g. a separate reference model
            return super()._get_per_token_logps_and_entropies(model, input_ids, attention_mask, logits_to_keep, batch_size,
                                                              compute_entropy, compute_aux_loss, **multimodal)  # fmt: skip
        if any(v is not None for v in multimodal.values()):
            raise NotImplementedError("MoEGRPOTrainer scores text-only batches (no images)")
        C = logits_to_keep
        replay = scoring.replay_picks(input_ids.shape[1], C, from_rollout=self.routing_replay == "rollout")
        record = scoring.record and replay is None
        measure = scoring.measure and scoring.generated is not None
        size = batch_size or input_ids.shape[0]
        outs, recorded = [], []
        for start in range(0, input_ids.shape[0], size):
            rows = slice(start, start + size)
            set_replay(self.handle, None if replay is None else replay[rows])
            with RoutingCapture(self.handle, natural=replay is not None) if (record or measure) else contextlib.nullcontext() as capture:
                outs.append(super()._get_per_token_logps_and_entropies(
                    model, input_ids[rows], attention_mask[rows], C, None, compute_entropy, compute_aux_loss))  # fmt: skip
            n = input_ids[rows].shape[0]
            if record:
                recorded.append(capture.rows(n))
            if measure:
                self._count_mismatch(capture, n, scoring.generated[rows], attention_mask[rows], C, replay is not None)
        if not torch.is_grad_enabled():
            set_replay(self.handle, None)  # no backward follows
        if record:
            scoring.replay, scoring.record = torch.cat(recorded), False
        logps = torch.cat([o[0] for o in outs])
        entropies = torch.cat([o[1] for o in outs]) if compute_entropy else None
        aux = torch.stack([o[2] for o in outs]).mean() if compute_aux_loss else None
        if scoring.measure:
            self._log_ratios(logps.detach(), attention_mask[:, -C:].bool(), scoring)
        return logps, entropies, aux

    # ---- metrics -----------------------------------------------------------------------------
    def _log(self, name: str, value: float) -> None:
        self._metrics["train" if self.model.training else "eval"][name].append(value)

    def _count_mismatch(self, capture: RoutingCapture, n: int, generated, attention, C: int, replayed: bool) -> None:
        """Routing metrics of one forward of n rows: its picks (and, under replay, the router's
        own) against generation's, over completion tokens that generation fed to the model."""
        used = capture.rows(n).sort(-1).values  # (n, S, L, k')
        own = capture.rows(n, "own").sort(-1).values if replayed else used
        gen = generated.sort(-1).values
        keep = torch.zeros_like(attention, dtype=torch.bool)
        keep[:, -C:] = attention[:, -C:].bool()
        keep &= generated[:, :, 0, 0] != UNRECORDED  # (n, S)
        differs_own = (own != gen).any(-1)[keep]  # (N, L)
        differs_used = (used != gen).any(-1)[keep]
        L = gen.shape[2]
        stats = torch.stack([differs_own.sum(), differs_used.sum(), differs_own.any(-1).sum(), keep.sum() * L, keep.sum()]).float()
        own_n, used_n, tokens_n, pairs, tokens = self.accelerator.reduce(stats, reduction="sum").tolist()
        if tokens:
            self._log("routing/mismatch", own_n / pairs)
            self._log("routing/mismatch_replayed", used_n / pairs)
            self._log("routing/mismatch_tokens", tokens_n / tokens)

    def _log_ratios(self, logps, mask, scoring: _Scoring) -> None:
        """Spread of the per-token importance ratios against generation and the old policy."""
        for name, ref in (("rollout", scoring.sampling), ("old", scoring.old)):
            if ref is None:
                continue
            ratio = torch.exp(logps - ref)[mask]  # (N,)
            big = torch.finfo(torch.float32).max
            local = torch.stack([ratio.sum(), (ratio * ratio).sum(), torch.tensor(float(ratio.numel()), device=ratio.device),
                                 ratio.min() if ratio.numel() else ratio.new_tensor(big),
                                 -(ratio.max() if ratio.numel() else ratio.new_tensor(-big))]).float()  # fmt: skip
            total, sq, count, low, neg_high = self.accelerator.gather(local[None]).view(-1, 5).T
            count_all = count.sum()
            if count_all == 0:
                continue
            mean = total.sum() / count_all
            self._log(f"ratio/{name}_mean", mean.item())
            self._log(f"ratio/{name}_std", (sq.sum() / count_all - mean * mean).clamp(min=0).sqrt().item())
            self._log(f"ratio/{name}_min", low.min().item())
            self._log(f"ratio/{name}_max", (-neg_high).max().item())

    def get_high_entropy_mask(self, entropies, mask, threshold):
        """TRL's forking-token mask, with what it kept and dropped logged."""
        keep = super().get_high_entropy_mask(entropies, mask, threshold)
        valid, e = mask.bool(), entropies.detach().float()
        dropped = valid & ~keep
        stats = torch.stack([valid.sum(), keep.sum(), (e * keep).sum(), dropped.sum(), (e * dropped).sum()]).float()
        n, kept, kept_sum, drop, drop_sum = self.accelerator.reduce(stats, reduction="sum").tolist()
        if n:
            self._log("entropy_mask/kept_fraction", kept / n)
            self._log("entropy_mask/kept_entropy", kept_sum / max(kept, 1))
            self._log("entropy_mask/dropped_entropy", drop_sum / max(drop, 1))
        return keep
