"""Overhead of the patch itself: step time (forward + backward) of the patched model with every
method off against the stock model, per family, and eager vs grouped_mm experts for the
patched forward. Ratios are measured in one process, stock and patched runs interleaved, and
reported as medians.

    python scripts/bench_patch.py                    # all families, CPU
    python scripts/bench_patch.py --families qwen3_moe --device cuda --dtype bfloat16

Shape: hidden 256, 32 experts, top-4, moe_intermediate 256, 2 MoE layers, 4 x 256 tokens.
"""

from __future__ import annotations

import argparse
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


def step_time(model, batch, device: str) -> float:
    if device == "cuda":
        torch.cuda.synchronize()
    t0 = time.perf_counter()
    model(**batch).loss.backward()
    if device == "cuda":
        torch.cuda.synchronize()
    model.zero_grad(set_to_none=True)
    return time.perf_counter() - t0


def compare(model, batch, device: str, repeats: int, make_b) -> tuple[float, float]:
    """Median step time of `model` as-is (a) and after `make_b(model)` (b), interleaved."""
    for _ in range(2):
        step_time(model, batch, device)
    a, b = [], []
    for _ in range(repeats):
        a.append(step_time(model, batch, device))
        undo = make_b(model)
        b.append(step_time(model, batch, device))
        undo()
    return statistics.median(a), statistics.median(b)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--families", default=",".join(ALL_FAMILIES))
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--dtype", default="float32")
    ap.add_argument("--repeats", type=int, default=15)
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--seq", type=int, default=256)
    args = ap.parse_args()
    dtype = getattr(torch, args.dtype)
    print(f"# {platform.processor() or platform.machine()}, {torch.get_num_threads()} threads, torch {torch.__version__}, "
          f"device {args.device}, {args.dtype}, {args.batch}x{args.seq} tokens, median of {args.repeats}")
    print("| family | stock grouped_mm (ms) | patched grouped_mm (ms) | patched / stock | patched eager (ms) | eager / grouped_mm |")
    print("|---|---|---|---|---|---|")
    for family in args.families.split(","):
        model = build(family, "grouped_mm", args.device, dtype)
        g = torch.Generator().manual_seed(0)
        ids = torch.randint(3, model.config.vocab_size, (args.batch, args.seq), generator=g).to(args.device)
        batch = {"input_ids": ids, "labels": ids}

        def patch(m):
            return moe_sft.patch_model(m).revert

        stock, patched = compare(model, batch, args.device, args.repeats, patch)

        handle = moe_sft.patch_model(model)

        def to_eager(m):
            m.set_experts_implementation("eager")
            return lambda: m.set_experts_implementation("grouped_mm")

        grouped, eager = compare(model, batch, args.device, args.repeats, to_eager)
        handle.revert()
        print(f"| {family} | {stock * 1e3:.1f} | {patched * 1e3:.1f} | {patched / stock:.3f} | "
              f"{eager * 1e3:.1f} | {eager / grouped:.2f} |", flush=True)


if __name__ == "__main__":
    main()
