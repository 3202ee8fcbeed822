"""Batched answering: greedy / beam generation with left padding, and log-likelihood choice.

Both yield one batch at a time, as (example positions, answers), so the caller can write
predictions as they finish. Prompts are batched longest first: similar lengths share a batch
(little padding) and an out-of-memory batch size shows on the first batch.
"""

from __future__ import annotations

from collections.abc import Iterator

import torch
from transformers import GenerationConfig, PreTrainedModel

# LLM-Adapters' training target for the commonsense sets is "the correct answer is <word>";
# log-likelihood scoring compares the <word>s after this prefix.
ANSWER_PREFIX = "the correct answer is"


def prepare_tokenizer(tokenizer):
    """Give `tokenizer` a pad token (its eos) if it has none; generation pads on the left."""
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    tokenizer.padding_side = "left"
    return tokenizer


def _input_device(model: PreTrainedModel) -> torch.device:
    return model.get_input_embeddings().weight.device


def _longest_first(lengths: list[int], batch_size: int) -> Iterator[list[int]]:
    order = sorted(range(len(lengths)), key=lambda i: -lengths[i])
    for start in range(0, len(order), batch_size):
        yield order[start : start + batch_size]


def _no_router_logits(model: PreTrainedModel) -> dict:
    # Evaluation needs no aux loss; transformers' aux-loss code also breaks on cached decoding
    # steps (its attention mask covers the whole sequence, the router logits one new token).
    return {"output_router_logits": False} if getattr(model.config, "output_router_logits", False) else {}


def generation_config(model: PreTrainedModel, tokenizer, *, max_new_tokens: int, num_beams: int) -> GenerationConfig:
    """Deterministic decoding, whatever sampling settings the checkpoint's generation_config has."""
    eos = model.generation_config.eos_token_id
    return GenerationConfig(
        max_new_tokens=max_new_tokens,
        do_sample=False,
        num_beams=num_beams,
        pad_token_id=tokenizer.pad_token_id,
        eos_token_id=eos if eos is not None else tokenizer.eos_token_id,
    )


@torch.inference_mode()
def generate(
    model: PreTrainedModel, tokenizer, prompts: list[str], *, batch_size: int = 8, max_new_tokens: int = 32, num_beams: int = 1
) -> Iterator[tuple[list[int], list[str]]]:
    """Yield (positions in `prompts`, generated continuations) per batch.

    Left padding keeps every prompt's last token at the end of its row, so the first new token
    of each row is predicted from its own prompt; generate() builds position ids from the
    attention mask, so padded rows see the same positions as unpadded ones. Only the new tokens
    are decoded (the prompt is cut off by length, not by searching for "### Response:").
    """
    if tokenizer.pad_token_id is None:
        raise ValueError("the tokenizer has no pad token; call moe_sft.evaluation.prepare_tokenizer(tokenizer) first")
    config = generation_config(model, tokenizer, max_new_tokens=max_new_tokens, num_beams=num_beams)
    lengths = [len(ids) for ids in tokenizer(prompts)["input_ids"]]
    device = _input_device(model)
    for idx in _longest_first(lengths, batch_size):
        enc = tokenizer([prompts[i] for i in idx], return_tensors="pt", padding=True, padding_side="left").to(device)
        out = model.generate(**enc, generation_config=config, **_no_router_logits(model))  # (B, prompt_len + new)
        new = out[:, enc["input_ids"].shape[1] :]
        yield idx, [t.strip() for t in tokenizer.batch_decode(new, skip_special_tokens=True)]


@torch.inference_mode()
def loglik_choose(
    model: PreTrainedModel, tokenizer, prompts: list[str], choices: list[tuple[str, ...]], *, batch_size: int = 8
) -> Iterator[tuple[list[int], list[tuple[str, dict[str, float]]]]]:
    """Multiple choice by log-likelihood: for prompt p and each choice c, the summed log-prob of
    the tokens of " c" after p + ANSWER_PREFIX. Yield (positions, [(best choice, {choice: logp})]).

    Context and continuation are tokenized separately and concatenated, so the scored tokens
    are exactly the choice's. Rows are right-padded (no generation here).
    """
    # per example: (position, choice, context ids, continuation ids) for each choice; whole
    # examples are batched so each yielded example has all its choices scored
    per_example = []
    for i, (prompt, opts) in enumerate(zip(prompts, choices)):
        ctx = tokenizer(prompt + ANSWER_PREFIX)["input_ids"]
        per_example.append([(i, c, ctx, tokenizer(" " + c, add_special_tokens=False)["input_ids"]) for c in opts])
    lengths = [max(len(r[2]) + len(r[3]) for r in reqs) for reqs in per_example]
    device = _input_device(model)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    for idx in _longest_first(lengths, batch_size):
        batch = [r for i in idx for r in per_example[i]]
        seqs = [r[2] + r[3] for r in batch]
        width = max(map(len, seqs))
        ids = torch.full((len(seqs), width), pad, dtype=torch.long)
        mask = torch.zeros_like(ids)
        for row, s in enumerate(seqs):
            ids[row, : len(s)] = torch.tensor(s)
            mask[row, : len(s)] = 1
        logits = model(input_ids=ids.to(device), attention_mask=mask.to(device), **_no_router_logits(model)).logits  # (R, width, V)
        scores: dict[int, dict[str, float]] = {i: {} for i in idx}
        for row, (i, c, ctx, cont) in enumerate(batch):
            # the token at position t is predicted by the logits at t - 1
            pos = torch.arange(len(ctx) - 1, len(ctx) + len(cont) - 1, device=logits.device)
            logp = logits[row, pos].float().log_softmax(-1)  # (len(cont), V)
            scores[i][c] = logp.gather(1, torch.tensor(cont, device=logp.device)[:, None]).sum().item()
        yield idx, [(max(scores[i], key=scores[i].get), scores[i]) for i in idx]
