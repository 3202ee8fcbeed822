"""TRL's fused LM head, for models whose logits are more than `lm_head(h)`.

TRL's SFT and GRPO trainers call `model(..., labels=labels, fused_lm_head=True)` (after
`trl.trainer.utils.add_fused_lm_head`): the forward then multiplies the final hidden states by
`lm_head.weight` itself, in tiles, and returns per-token log-probabilities instead of logits.
Anything attached to the output embedding (the MoE-Bias head adds a per-token mixture of bias
vectors to the logits) is bypassed: the policy TRL scores and trains is not the one that
generates, and the head gets no gradient.

`fused_output` computes the same `FusedCausalLMOutput` from the model's real logits, so a
model can answer the fused protocol exactly (at the cost of the full logits, as the plain
Trainer pays). `fused_settings` reads what TRL asked `add_fused_lm_head` for (temperature,
which per-token outputs) from the fused forward it installed.
"""

from __future__ import annotations

import torch

FUSED_KWARGS = ("fused_lm_head", "labels", "shift_labels", "num_items_in_batch")
_ALL_OUTPUTS = ("log_probs", "entropy", "log_sum_sq_probs", "mean_logits", "is_top1")


def _closure(fn) -> dict:
    code, cells = getattr(fn, "__code__", None), getattr(fn, "__closure__", None) or ()
    return dict(zip(code.co_freevars, (c.cell_contents for c in cells))) if code is not None else {}


def fused_settings(model) -> dict:
    """{"temperature": T, "outputs": (...)} of the fused forward TRL installed on `model`
    (`model.forward`, a closure of `add_fused_lm_head`), found through the wrappers others put
    around it (accelerate's mixed-precision `convert_outputs_to_fp32` / autocast wrappers keep
    the wrapped function in `__wrapped__` or a closure cell); defaults when none is found."""
    todo, seen = [getattr(model, "forward", None)], set()
    while todo:
        fn = todo.pop()
        fn = getattr(fn, "__func__", fn)  # bound method -> function
        if fn is None or id(fn) in seen or not callable(fn):
            continue
        seen.add(id(fn))
        found = _closure(fn)
        if "temperature" in found and "outputs" in found:
            return {"temperature": float(found["temperature"]), "outputs": tuple(found["outputs"])}
        todo.extend([getattr(fn, "__wrapped__", None), *(v for v in found.values() if callable(v))])
    return {"temperature": 1.0, "outputs": _ALL_OUTPUTS}


def fused_output(
    logits: torch.Tensor,
    labels: torch.Tensor | None,
    *,
    shift_labels: torch.Tensor | None = None,
    num_items_in_batch=None,
    temperature: float = 1.0,
    outputs: tuple[str, ...] = _ALL_OUTPUTS,
    aux_loss: torch.Tensor | None = None,
    aux_coef: float = 0.0,
):
    """TRL's `FusedCausalLMOutput` from full logits (B, S, V).

    Without `shift_labels`, position t scores label t + 1: fields are (B, S - 1); with it,
    (B, S). Every per-token field is 0 where the label is -100; `loss` is the mean negative
    log-likelihood over the labelled tokens (or their sum / num_items_in_batch), plus
    aux_coef * aux_loss when the router aux loss was requested."""
    from trl.trainer.utils import FusedCausalLMOutput

    if shift_labels is None:
        logits, target = logits[:, :-1], labels[:, 1:]
    else:
        target = shift_labels
    target = target.to(logits.device)
    mask = target != -100  # (B, S')
    z = logits.float() / temperature  # (B, S', V)
    logp = torch.log_softmax(z, dim=-1)
    safe = target.clamp(min=0).unsqueeze(-1)
    log_probs = logp.gather(-1, safe).squeeze(-1).masked_fill(~mask, 0.0)
    fields = {"log_probs": log_probs}
    if "entropy" in outputs:
        fields["entropy"] = -(logp.exp() * logp).sum(-1).masked_fill(~mask, 0.0)
    with torch.no_grad():
        if "log_sum_sq_probs" in outputs:
            fields["log_sum_sq_probs"] = torch.logsumexp(2 * logp, dim=-1).masked_fill(~mask, 0.0)
        if "mean_logits" in outputs:
            fields["mean_logits"] = z.mean(-1).masked_fill(~mask, 0.0)
        if "is_top1" in outputs:
            fields["is_top1"] = (z.argmax(-1) == target) & mask
    denominator = mask.sum().clamp(min=1) if num_items_in_batch is None else num_items_in_batch
    loss = -log_probs.sum() / denominator
    if aux_loss is not None:
        loss = loss + aux_coef * aux_loss.to(loss.device)
    return FusedCausalLMOutput(loss=loss, label_mask=mask, aux_loss=aux_loss, **fields)
