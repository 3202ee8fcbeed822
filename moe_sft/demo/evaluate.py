"""How the demo measures a model: exact-match accuracy per skill, accuracy over skill groups,
expert usage (overall and per skill), and accuracy with experts masked (`moe_sft.pruning`).

Accuracy is exact match of greedy decoding, computed in one teacher-forced forward: greedy
decoding produces `answer</s>` exactly when, at every answer position, the argmax next token
given the gold prefix is the gold token (the first wrong argmax is where decoding would leave
the answer). `tests/test_demo.py` checks this against `model.generate`.
"""

from __future__ import annotations

import math

import torch

from . import corpus

PROFILE_BATCH = 256  # texts per forward of a profiling pass


# ---- accuracy -------------------------------------------------------------------------------
@torch.no_grad()
def exact_match(model, tokenizer, pairs: list[tuple[str, str]], batch_size: int = 256) -> list[bool]:
    """Per (question, answer): does greedy decoding after `<s>question=` give `answer</s>`?
    One teacher-forced forward per batch (see the module docstring)."""
    eos = tokenizer.eos_token_id
    prompts = tokenizer([f"<s>{q}=" for q, _ in pairs], add_special_tokens=False)["input_ids"]  # one batched call
    answers = tokenizer([a for _, a in pairs], add_special_tokens=False)["input_ids"]
    rows = [(p, r + [eos]) for p, r in zip(prompts, answers)]
    was_training = model.training
    model.eval()
    out = []
    for start in range(0, len(rows), batch_size):
        chunk = rows[start : start + batch_size]
        n = max(len(p) + len(r) for p, r in chunk)
        ids = torch.full((len(chunk), n), tokenizer.pad_token_id, dtype=torch.long)
        mask = torch.zeros_like(ids)
        for i, (p, r) in enumerate(chunk):
            ids[i, : len(p) + len(r)] = torch.tensor(p + r)
            mask[i, : len(p) + len(r)] = 1
        pred = model(input_ids=ids, attention_mask=mask, use_cache=False).logits.argmax(-1)  # (B, n)
        for i, (p, r) in enumerate(chunk):
            # position j predicts token j+1: the answer's tokens are predicted at len(p)-1 ...
            out.append(pred[i, len(p) - 1 : len(p) - 1 + len(r)].tolist() == r)
    model.train(was_training)
    return out


def skill_accuracy(model, tokenizer, evalset: dict[str, list]) -> dict[str, float]:
    """{skill: fraction of its held-out questions answered exactly}."""
    flat = [pair for name in corpus.SKILL_NAMES for pair in evalset[name]]
    ok = exact_match(model, tokenizer, flat)
    acc, i = {}, 0
    for name in corpus.SKILL_NAMES:
        n = len(evalset[name])
        acc[name] = sum(ok[i : i + n]) / n
        i += n
    return acc


def weighted(acc: dict[str, float], skills) -> float:
    """Accuracy over `skills` weighted by their corpus frequency."""
    w = corpus.skill_weights()
    return math.fsum(w[k] * acc[k] for k in skills) / math.fsum(w[k] for k in skills)


def rare_skills(target: str) -> list[str]:
    """The skills rarer than uniform in the corpus, the fine-tuning target excluded."""
    w = corpus.skill_weights()
    return [k for k in corpus.SKILL_NAMES if k != target and w[k] < 1 / len(w)]


def groups(acc: dict[str, float], target: str) -> dict[str, float]:
    """The demo's accuracy groups: the target skill; the rare skills (unweighted mean); every
    skill but the target and every skill (both weighted by corpus frequency)."""
    rare = rare_skills(target)
    return {
        "target": acc[target],
        "rare": math.fsum(acc[k] for k in rare) / len(rare),
        "other": weighted(acc, [k for k in corpus.SKILL_NAMES if k != target]),
        "all": weighted(acc, corpus.SKILL_NAMES),
    }


# ---- expert usage ---------------------------------------------------------------------------
def profile(model, tokenizer, texts: list[str], name: str = ""):
    from ..pruning import profile_model

    return profile_model(model, tokenizer, texts, batch_size=PROFILE_BATCH, model_id=name, data="demo corpus")


def shares(counts: torch.Tensor) -> torch.Tensor:
    """(L, E) counts -> each layer's share of the selections (float64)."""
    counts = counts.double()
    return counts / counts.sum(1, keepdim=True).clamp_min(1)


def usage_entropy(prof) -> float:
    """Mean over MoE layers of the entropy of the experts' selection shares / ln E (1 = uniform)."""
    p = shares(prof.counts)
    ent = -(p * p.clamp_min(1e-30).log()).sum(1) / math.log(prof.num_experts)
    return float(ent.mean())


def skill_routing(model, tokenizer, texts_per_skill: dict[str, list[str]]) -> dict[str, torch.Tensor]:
    """{skill: (L, E) expert selection counts over that skill's texts}."""
    return {k: profile(model, tokenizer, texts).counts for k, texts in texts_per_skill.items()}


def tail_share(counts: torch.Tensor, selection: dict[int, list[int]], layers: list[int]) -> list[float]:
    """Per layer: the share of the selections in `counts` (L, E) that go to `selection`'s experts."""
    p = shares(counts)
    return [float(p[row, selection.get(layer, [])].sum()) for row, layer in enumerate(layers)]


def always_active(model) -> dict[int, list[int]]:
    """The experts a patched model runs for every token (condensers), per layer: they cannot
    be masked, so no pruning candidate set includes them."""
    from ..patching import get_handle

    handle = get_handle(model)
    if handle is None:
        return {}
    return {m.layer_idx: sorted(m.controls.expert_ids["forced"]) for m in handle.layers if m.controls.forced is not None}


# ---- accuracy with experts masked -------------------------------------------------------------
def masked_accuracy(model, tokenizer, evalset, selection) -> dict[str, float]:
    from ..pruning import masked

    with masked(model, selection):
        return skill_accuracy(model, tokenizer, evalset)


def prune_compare(model, tokenizer, evalset, prof, *, ratio: float, seeds: int, strategies=("least_used",)) -> dict:
    """Accuracy per skill with each strategy's experts masked (`ratio` of each layer's experts,
    from `prof`), and with random ones (same count per layer as least_used, one draw per seed in
    range(seeds)). Always-active experts are never candidates."""
    from ..pruning import select_experts

    keep = always_active(model)
    out = {}
    for strategy in strategies:
        sel = select_experts(prof, strategy, ratio=ratio, exclude=keep)
        out[strategy] = {"experts": sel, "accuracy": masked_accuracy(model, tokenizer, evalset, sel)}
    out["random"] = []
    for seed in range(seeds):
        sel = select_experts(prof, "random", ratio=ratio, seed=seed, controls="least_used", exclude=keep)
        out["random"].append({"seed": seed, "experts": sel, "accuracy": masked_accuracy(model, tokenizer, evalset, sel)})
    return out
