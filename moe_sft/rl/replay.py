"""Routing replay for RL: record the routed experts of a forward, replay them in later forwards.

Layout of a record: one tensor (B, S, L, k') int16 per batch, batch first so it rides through
TRL's shuffling and splitting of the generation batch with the other per-row tensors:
B rows, S token positions (prompt + completion, as TRL's scoring forward lays them out), L
patched MoE layers (in `handle.layers` order), k' routed picks (forced condenser experts are
not part of it: `route` appends them itself). Only the selection is replayed; the gate weights
come from the current router scores (`moe_sft.routing.route`, `MoEControls.replay`).

The generation record (`GenerationRecorder`) comes from transformers' `generate` with its KV
cache: the prefill forward routes the B x P prompt tokens, each decode step the B tokens it
feeds, so completion token j is routed in decode step j + 1 and the last generated token is
never fed (its record is filled in, see `align`).
"""

from __future__ import annotations

import dataclasses

import torch

from ..patching import PatchHandle
from ..routing import route

PICK_DTYPE = torch.int16  # expert ids < 32768; a quarter of int64's memory for long rollouts
UNRECORDED = -1  # marks positions without a record in tensors used for measurement


def _in_recompute() -> bool:
    """True inside an activation-checkpoint recompute (run by the autograd engine)."""
    return torch._C._current_graph_task_id() != -1


class RoutingCapture:
    """Context manager: every routing of every patched layer in its scope, per layer in call
    order, as (T, k') routed picks (int16). With `natural=True`, also what the router would
    have picked without `MoEControls.replay` (the same `route` call with replay unset), for
    measuring what replay changed. Recomputes under activation checkpointing are skipped."""

    def __init__(self, handle: PatchHandle, natural: bool = False):
        self.handle = handle
        self.natural = natural
        self.picks: list[list[torch.Tensor]] = [[] for _ in handle.layers]
        self.own: list[list[torch.Tensor]] = [[] for _ in handle.layers]  # natural picks
        self._removers: list = []

    def _observer(self, slot: int):
        def observe(layer_idx, routing, x, block):
            if _in_recompute():
                return
            k = routing.num_routed
            self.picks[slot].append(routing.index[:, :k].to(PICK_DTYPE))
            if self.natural:
                self.own[slot].append(_own_picks(block, routing, x)[:, :k].to(PICK_DTYPE))

        return observe

    def __enter__(self) -> RoutingCapture:
        self._removers = [m.controls.observe(self._observer(i), training_only=False) for i, m in enumerate(self.handle.layers)]
        return self

    def __exit__(self, *exc) -> None:
        for remove in self._removers:
            remove()
        self._removers = []

    def rows(self, rows: int, which: str = "picks") -> torch.Tensor:
        """The captured forwards as (rows, S, L, k'): each forward routed rows x S tokens."""
        per_layer = self.picks if which == "picks" else self.own
        layers = [torch.cat([p.view(rows, -1, p.shape[-1]) for p in calls], 0) for calls in per_layer]
        return torch.stack(layers, dim=2)


@torch.no_grad()  # nothing saved for backward: an activation-checkpoint recompute (skipped) must save the same tensors
def _own_picks(block, routing, x) -> torch.Tensor:
    """The routed picks `route` gives for this layer's logits with replay unset (T, K)."""
    ctl = block.moe_sft
    replay, ctl.replay = ctl.replay, None
    try:
        if replay is None:
            return routing.index
        return route(ctl.spec, routing.logits, ctl, block._moe_sft_adapter.selection_correction(block), x).index
    finally:
        ctl.replay = replay


def set_replay(handle: PatchHandle, picks: torch.Tensor | None) -> None:
    """Make the next forward of `handle`'s model route with `picks` (B, S, L, k') for its B x S
    tokens (None: route normally). Stays set until changed, so activation-checkpoint
    recomputes during backward replay the same experts."""
    for slot, m in enumerate(handle.layers):
        m.controls.replay = None if picks is None else picks[:, :, slot].reshape(-1, picks.shape[-1]).long()


@dataclasses.dataclass
class Rollout:
    """What one `generate` call recorded.

    picks        (B, P + C_gen - 1, L, k'): the prompt's P positions, then the completion tokens
                 that were fed back (every generated token but the last)
    prompt_len   P, the left-padded prompt width of the generate call
    logps        (B, C_gen) fp32 log-probabilities of the generated tokens under
                 softmax(logits / temperature) of the logits generate sampled from; None when not recorded
    """

    picks: torch.Tensor
    prompt_len: int
    logps: torch.Tensor | None = None


def align(picks: torch.Tensor, prompt_len: int, seq_len: int, *, fill: str) -> torch.Tensor:
    """A (B, S_rec, L, k') record laid out for a scoring forward of `seq_len` = prompt_len +
    completion positions (TRL pads completions to the longest kept one, or further with
    pad_to_multiple_of). Positions past the record are the last generated token and padding,
    whose routing reaches no scored log-prob: `fill="copy"` repeats the last recorded position
    (valid experts for replay), `fill="unrecorded"` marks them UNRECORDED (left out of metrics)."""
    have = picks.shape[1]
    if have >= seq_len:
        return picks[:, :seq_len]
    tail = picks[:, -1:].expand(-1, seq_len - have, -1, -1)
    if fill == "unrecorded":
        tail = torch.full_like(tail, UNRECORDED)
    return torch.cat([picks, tail], dim=1)


class GenerationRecorder:
    """Context manager around one `generate` call of `handle`'s model: the routed picks of the
    prefill and of every decode step, and (with `logps=True`) the log-probabilities of the
    tokens it generated, read from the logits it sampled from.

    The log-probability of completion token j needs the logits of forward j and the token
    itself, which generate feeds in forward j + 1: each forward gathers the previous forward's
    log-softmax at its input ids; `result` gathers the last forward's at the final tokens."""

    def __init__(self, handle: PatchHandle, *, temperature: float, logps: bool):
        self.handle = handle
        self.temperature = temperature
        self.capture = RoutingCapture(handle)
        self.want_logps = logps
        self._last: torch.Tensor | None = None  # (B, V) log-softmax of the previous forward
        self._logps: list[torch.Tensor] = []  # (B,) per fed completion token
        self._hook = None

    def _on_forward(self, module, args, kwargs, output) -> None:
        ids = kwargs.get("input_ids", args[0] if args else None)  # (B, 1) in decode steps
        if self._last is not None:
            self._logps.append(self._last.gather(1, ids[:, -1:].to(self._last.device)).squeeze(1))
        self._last = torch.log_softmax(output.logits[:, -1].float() / self.temperature, dim=-1)

    def __enter__(self) -> GenerationRecorder:
        self.capture.__enter__()
        if self.want_logps:
            self._hook = self.handle.model.register_forward_hook(self._on_forward, with_kwargs=True)
        return self

    def __exit__(self, *exc) -> None:
        self.capture.__exit__(*exc)
        if self._hook is not None:
            self._hook.remove()

    def result(self, completions: list[list[int]]) -> Rollout:
        """The record of a generate call over len(completions) rows; `completions` are the
        generated token ids per row, cut after EOS (what TRL keeps)."""
        B = len(completions)
        calls = self.capture.picks[0]
        prefill, steps = calls[0], len(calls) - 1
        if prefill.shape[0] % B or any(c.shape[0] != B for c in calls[1:]):
            raise RuntimeError(
                f"routing replay: generate's forwards routed {[c.shape[0] for c in calls]} tokens for {B} rows; only "
                "the plain KV-cache path (one prefill, then one token per row per step) can be recorded"
            )
        P = prefill.shape[0] // B
        layers = []
        for calls in self.capture.picks:  # per layer: (B, P, k') then (B, steps, k')
            parts = [calls[0].view(B, P, -1)] + ([torch.stack(calls[1:], dim=1)] if steps else [])
            layers.append(torch.cat(parts, dim=1))
        picks = torch.stack(layers, dim=2)  # (B, P + steps, L, k')
        return Rollout(picks=picks, prompt_len=P, logps=self._final_logps(completions, steps) if self.want_logps else None)

    def _final_logps(self, completions: list[list[int]], steps: int) -> torch.Tensor:
        """(B, steps + 1): the fed tokens' log-probs, then the last forward's at each row's token
        of that position (rows that ended earlier hold padding there, never scored)."""
        last_tokens = torch.tensor([c[steps] if len(c) > steps else 0 for c in completions], device=self._last.device)
        final = self._last.gather(1, last_tokens[:, None]).squeeze(1)
        return torch.stack([*self._logps, final], dim=1)
