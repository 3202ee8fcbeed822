"""Step time (forward + backward) of the condenser method against the unpatched model.

    python scripts/bench_condenser.py [--runs 15] [--threads 1] [--moe-intermediate 128] [--family qwen3_moe]

One model instance; each variant is patched onto it, timed, and reverted, round-robin so
slow drifts of a shared machine hit every variant alike. Variants:
    stock            the unpatched transformers model
    patched_off      moe_sft patch with every method off (the generic forward alone)
    compute_neutral  router bias + r = 2 long-tail condensers, k - r routed + r = k experts
    additive         router bias + r = 2 long-tail condensers, k routed + r = k + 2 experts
The condenser variants include the per-step bias update. Prints a Markdown table of median
step times and ratios to `stock`.
"""

from __future__ import annotations

import argparse
import platform
import statistics
import time

import torch

import moe_sft
from moe_sft.methods.condenser import CondenserConfig, CondensersConfig, RouterBiasConfig, update_router_bias
from moe_sft.testing import tiny_batch, tiny_model

SHAPE = dict(
    hidden_size=256,
    num_experts=32,
    num_experts_per_tok=4,
    intermediate_size=1024,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    head_dim=64,
    vocab_size=1024,
    norm_topk_prob=True,
)
BATCH, SEQ = 4, 256


def _variants(model) -> dict:
    handle = moe_sft.patch_model(model)
    longtail = {m.layer_idx: [30, 31] for m in handle.layers}
    handle.revert()

    def condenser(budget):
        cc = CondensersConfig(num=2, budget=budget, experts=longtail)
        return moe_sft.MoESFTConfig(condenser=CondenserConfig(bias=RouterBiasConfig(gamma=1e-3), condensers=cc))

    return {
        "stock": None,
        "patched_off": moe_sft.MoESFTConfig(),
        "compute_neutral": condenser("compute_neutral"),
        "additive": condenser("additive"),
    }


def _step(model, batch, handle) -> float:
    t0 = time.perf_counter()
    model.zero_grad(set_to_none=True)
    model(**batch).loss.backward()
    if handle is not None and handle.config.condenser is not None:
        update_router_bias(handle)
    return time.perf_counter() - t0


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--runs", type=int, default=15)
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--moe-intermediate", type=int, default=128, help="expert FFN width (hidden is 256)")
    ap.add_argument("--family", default="qwen3_moe")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)

    shape = {**SHAPE, "moe_intermediate_size": args.moe_intermediate}
    model = tiny_model(args.family, experts_implementation="grouped_mm", **shape).train()
    batch = tiny_batch(model, batch=BATCH, seq=SEQ)
    variants = _variants(model)
    times: dict[str, list[float]] = {name: [] for name in variants}
    for rep in range(args.warmup + args.runs):
        for name, cfg in variants.items():
            handle = moe_sft.patch_model(model, cfg) if cfg is not None else None
            t = _step(model, batch, handle)
            if handle is not None:
                handle.revert()
            if rep >= args.warmup:
                times[name].append(t)

    print(f"{args.family}: {shape}, batch {BATCH}x{SEQ} tokens, grouped_mm experts, fp32")
    print(f"torch {torch.__version__}, {platform.processor() or platform.machine()}, {args.threads} threads, "
          f"median of {args.runs} steps (forward + backward) after {args.warmup} warm-up")
    print()
    print("| variant | experts per token | median step (ms) | ratio to stock |")
    print("|---|---|---|---|")
    base = statistics.median(times["stock"])
    per_token = {"stock": "4", "patched_off": "4", "compute_neutral": "2 routed + 2 condensers", "additive": "4 routed + 2 condensers"}
    for name, ts in times.items():
        med = statistics.median(ts)
        print(f"| {name} | {per_token[name]} | {med * 1e3:.1f} | {med / base:.3f} |")


if __name__ == "__main__":
    main()
