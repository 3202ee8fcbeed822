"""Overhead of the patch itself: step time (forward + backward) of the patched model with every
method off against the stock model, per family, and eager vs grouped_mm experts for the
patched forward.

Fairness and precision: one model instance per family; its three variants (stock grouped_mm,
patched grouped_mm, patched eager) take turns step by step, in an order that rotates every
round, so load changes and cache effects hit them alike; the patch and the experts setting
change outside the timed region. Torch threads are pinned (`--threads`, default 1, as the
other benchmarks); on CPU a step is timed as this process's CPU time, which other jobs on a
shared machine do not inflate. A ratio is the median over rounds of the per-round ratio
(adjacent steps); rounds continue past `--repeats` until the distribution-free 95% confidence
interval of each median lies within ±`--tolerance` (default 5%) of it, or `--max-repeats`.
Reported: the medians, their 95% CI and the rounds taken.

    python scripts/bench_patch.py                    # all families, CPU
    python scripts/bench_patch.py --families qwen3_moe --device cuda --dtype bfloat16

Shape: hidden 256, 32 experts, top-4, moe_intermediate 256, 2 MoE layers, 4 x 256 tokens.
"""

from __future__ import annotations

import argparse
import math
import platform
import statistics
import time

import torch

import moe_sft
from moe_sft.testing import ALL_FAMILIES, tiny_model

SHAPE = dict(hidden_size=256, num_attention_heads=4, num_key_value_heads=2, vocab_size=512)
EXPERTS = {  # per-family names of the expert-count and expert-width fields
    "qwen2_moe": dict(num_experts=32, moe_intermediate_size=256, shared_expert_intermediate_size=256),
    "qwen3_moe": dict(num_experts=32, moe_intermediate_size=256, head_dim=64),
    "deepseek_v2": dict(n_routed_experts=32, moe_intermediate_size=256, n_group=4, topk_group=2),
    "deepseek_v3": dict(n_routed_experts=32, moe_intermediate_size=256, n_group=4, topk_group=2),
    "olmoe": dict(num_experts=32, intermediate_size=256),
    "mixtral": dict(num_local_experts=32, intermediate_size=256, head_dim=64),
    "glm4_moe": dict(n_routed_experts=32, moe_intermediate_size=256, n_group=4, topk_group=2, head_dim=64),
    "qwen3_next": dict(num_experts=32, moe_intermediate_size=256, shared_expert_intermediate_size=256, head_dim=64),
}


def build(family: str, impl: str, device: str, dtype: torch.dtype):
    layers = {"deepseek_v2": 3, "deepseek_v3": 3, "glm4_moe": 3, "qwen2_moe": 2}.get(family, 2)
    extra = {"mlp_only_layers": []} if family == "qwen2_moe" else {}
    model = tiny_model(family, experts_implementation=impl, dtype=dtype, num_hidden_layers=layers,
                       **SHAPE, **EXPERTS[family], **extra)
    return model.to(device).train()


VARIANTS = ("stock", "patched", "eager")


def step_time(model, batch, device: str) -> float:
    """One forward + backward: wall time with CUDA (synchronised), this process's CPU time on CPU."""
    clock = time.perf_counter if device == "cuda" else time.process_time
    if device == "cuda":
        torch.cuda.synchronize()
    t0 = clock()
    model(**batch).loss.backward()
    if device == "cuda":
        torch.cuda.synchronize()
    took = clock() - t0
    model.zero_grad(set_to_none=True)
    return took


def timed_variant(model, batch, device: str, variant: str) -> float:
    """Step time of `variant`, set up and undone outside the timed step."""
    handle = None if variant == "stock" else moe_sft.patch_model(model)
    if variant == "eager":
        model.set_experts_implementation("eager")
    took = step_time(model, batch, device)
    if variant == "eager":
        model.set_experts_implementation("grouped_mm")
    if handle is not None:
        handle.revert()
    return took


def median_ci(values: list[float]) -> tuple[float, float, float]:
    """Median and its distribution-free 95% confidence interval (order statistics)."""
    xs = sorted(values)
    n = len(xs)
    k = max(0, math.floor((n - 1.96 * math.sqrt(n)) / 2))
    return statistics.median(xs), xs[k], xs[n - 1 - k]


def precise(values: list[float], tolerance: float) -> bool:
    mid, lo, hi = median_ci(values)
    return lo >= mid * (1 - tolerance) and hi <= mid * (1 + tolerance)


def measure(model, batch, args) -> dict[str, list[float]]:
    """Step times per variant, interleaved round by round (rotating order) until both ratios are precise."""
    times: dict[str, list[float]] = {v: [] for v in VARIANTS}
    for rnd in range(args.warmup + args.max_repeats):
        order = VARIANTS[rnd % 3 :] + VARIANTS[: rnd % 3]
        step = {v: timed_variant(model, batch, args.device, v) for v in order}
        if rnd < args.warmup:
            continue
        for v in VARIANTS:
            times[v].append(step[v])
        n = rnd + 1 - args.warmup
        if n >= args.repeats and all(precise(r, args.tolerance) for r in ratios(times).values()):
            break
    return times


def ratios(times: dict[str, list[float]]) -> dict[str, list[float]]:
    return {
        "patched / stock": [p / s for p, s in zip(times["patched"], times["stock"])],
        "eager / grouped_mm": [e / p for e, p in zip(times["eager"], times["patched"])],
    }


def fmt_ratio(values: list[float]) -> str:
    mid, lo, hi = median_ci(values)
    return f"{mid:.3f} [{lo:.3f}, {hi:.3f}]"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--families", default=",".join(ALL_FAMILIES))
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--dtype", default="float32")
    ap.add_argument("--threads", type=int, default=1, help="torch intra-op threads (default 1)")
    ap.add_argument("--repeats", type=int, default=15, help="rounds at least (one step per variant each)")
    ap.add_argument("--max-repeats", type=int, default=150, help="rounds at most")
    ap.add_argument("--tolerance", type=float, default=0.05, help="stop once each ratio's 95%% CI is within ± this")
    ap.add_argument("--warmup", type=int, default=2, help="untimed rounds first")
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--seq", type=int, default=256)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    dtype = getattr(torch, args.dtype)
    clock = "wall time" if args.device == "cuda" else "process CPU time"
    print(f"# {platform.processor() or platform.machine()}, {torch.get_num_threads()} threads, torch {torch.__version__}, "
          f"device {args.device}, {args.dtype}, {args.batch}x{args.seq} tokens; {clock} per step; variants interleaved; "
          f"ratios: median of per-round ratios [95% CI], rounds until the CI is within ±{args.tolerance:.0%} "
          f"({args.repeats}-{args.max_repeats})")
    print("| family | stock grouped_mm (ms) | patched grouped_mm (ms) | patched / stock [95% CI] | patched eager (ms) | "
          "eager / grouped_mm [95% CI] | rounds |")
    print("|---|---|---|---|---|---|---|")
    for family in args.families.split(","):
        model = build(family, "grouped_mm", args.device, dtype)
        g = torch.Generator().manual_seed(0)
        ids = torch.randint(3, model.config.vocab_size, (args.batch, args.seq), generator=g).to(args.device)
        times = measure(model, {"input_ids": ids, "labels": ids}, args)
        ms = {v: statistics.median(t) * 1e3 for v, t in times.items()}
        r = ratios(times)
        rounds = f"{len(times['stock'])}" + ("" if all(precise(v, args.tolerance) for v in r.values()) else " (max; CI wider)")
        print(f"| {family} | {ms['stock']:.1f} | {ms['patched']:.1f} | {fmt_ratio(r['patched / stock'])} | "
              f"{ms['eager']:.1f} | {fmt_ratio(r['eager / grouped_mm'])} | {rounds} |", flush=True)


if __name__ == "__main__":
    main()
