"""GPU throughput of a Qwen3-30B-A3B-shaped slice: real hidden size (2048), expert count (128),
top-k (8), expert width (768), attention (32 query / 4 KV heads of 128) and vocabulary
(151,936), but only a few decoder layers, in bf16. Training step = forward + backward
(no optimizer: its cost does not depend on the patch). Measured, in one process, interleaved:
stock, patched with every method off, and the patched model with `eager` experts.

    python scripts/bench_gpu.py --layers 4 --batch 8 --seq 2048

Model FLOPs per token (forward; a training step is 3x: backward = 2x forward), counting
multiply-adds as 2 FLOPs and only the matmuls:
    per layer   2 * (H*(Hq + 2*Hkv) + Hq*H)          q, k, v, o projections  (Hq = 32*128, Hkv = 4*128)
              + 2 * H * E                              router
              + 2 * k * 3 * H * I                      k experts of gate/up/down (SwiGLU)
              + 2 * 2 * Hq * S / 2                     attention scores and values, causal (mean context S/2)
    once        2 * H * V                              lm_head
MFU = 3 * FLOPs/token * tokens/s / peak dense bf16 FLOP/s of the GPU (H100/H200 SXM: 989e12).
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

import moe_sft

QWEN3_30B_A3B = dict(
    vocab_size=151936, hidden_size=2048, intermediate_size=6144, num_attention_heads=32, num_key_value_heads=4,
    head_dim=128, num_experts=128, num_experts_per_tok=8, moe_intermediate_size=768, norm_topk_prob=True,
    max_position_embeddings=40960, rope_theta=1e6, rms_norm_eps=1e-6, tie_word_embeddings=False,
)  # fmt: skip
PEAK_BF16 = {"H100": 989e12, "H200": 989e12, "A100": 312e12, "L40S": 362e12}  # dense, no sparsity


def flops_per_token(cfg: dict, layers: int, seq: int) -> float:
    H, V, E, k, I = cfg["hidden_size"], cfg["vocab_size"], cfg["num_experts"], cfg["num_experts_per_tok"], cfg["moe_intermediate_size"]
    Hq = cfg["num_attention_heads"] * cfg["head_dim"]
    Hkv = cfg["num_key_value_heads"] * cfg["head_dim"]
    per_layer = 2 * (H * (Hq + 2 * Hkv) + Hq * H) + 2 * H * E + 2 * k * 3 * H * I + 2 * 2 * Hq * seq / 2
    return layers * per_layer + 2 * H * V


def peak_flops(name: str) -> float | None:
    return next((v for k, v in PEAK_BF16.items() if k in name), None)


def step(model, batch) -> float:
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    model(**batch).loss.backward()
    torch.cuda.synchronize()  # kernels are asynchronous: time until they have finished
    dt = time.perf_counter() - t0
    model.zero_grad(set_to_none=True)
    return dt


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--seq", type=int, default=2048)
    ap.add_argument("--repeats", type=int, default=10)
    ap.add_argument("--warmup", type=int, default=3)
    args = ap.parse_args()
    if not torch.cuda.is_available():
        raise SystemExit("bench_gpu.py: no CUDA device (torch.cuda.is_available() is False)")
    from transformers import AutoConfig, AutoModelForCausalLM

    device = torch.device("cuda")
    cfg = {**QWEN3_30B_A3B, "num_hidden_layers": args.layers}
    torch.manual_seed(0)
    config = AutoConfig.for_model("qwen3_moe", **cfg)
    with device:  # build the weights on the GPU directly
        model = AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16, experts_implementation="grouped_mm")
    model.train()
    g = torch.Generator(device=device).manual_seed(0)
    ids = torch.randint(0, cfg["vocab_size"], (args.batch, args.seq), generator=g, device=device)
    batch = {"input_ids": ids, "labels": ids}

    variants = ("stock", "patched_off", "patched_eager")
    times = {v: [] for v in variants}
    for rep in range(args.warmup + args.repeats):
        for v in variants:
            handle = moe_sft.patch_model(model) if v != "stock" else None
            if v == "patched_eager":
                model.set_experts_implementation("eager")
            t = step(model, batch)
            if v == "patched_eager":
                model.set_experts_implementation("grouped_mm")
            if handle is not None:
                handle.revert()
            if rep >= args.warmup:
                times[v].append(t)

    name = torch.cuda.get_device_name(device)
    tokens = args.batch * args.seq
    fpt = flops_per_token(cfg, args.layers, args.seq)
    peak = peak_flops(name)
    params = sum(p.numel() for p in model.parameters())
    print(f"{name}, torch {torch.__version__}, bf16, qwen3_moe slice: {args.layers} layers of Qwen3-30B-A3B "
          f"({params / 1e9:.2f}B parameters), {args.batch}x{args.seq} tokens, forward + backward, "
          f"median of {args.repeats} after {args.warmup} warm-up; model FLOPs {fpt / 1e9:.3f} GFLOP/token (forward)")
    print()
    print("| variant | median step (ms) | tokens/s | MFU | / stock |")
    print("|---|---|---|---|---|")
    base = statistics.median(times["stock"])
    for v in variants:
        med = statistics.median(times[v])
        tps = tokens / med
        mfu = f"{3 * fpt * tps / peak:.1%}" if peak else "n/a (unknown peak)"
        print(f"| {v} | {med * 1e3:.1f} | {tps:,.0f} | {mfu} | {med / base:.3f} |")
    print(f"\npeak memory {torch.cuda.max_memory_allocated(device) / 2**30:.1f} GiB")


if __name__ == "__main__":
    main()
