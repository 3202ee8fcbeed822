"""Benchmark DenseMixer (fast / recompute) against a vanilla training step.

Shape: a 2-layer qwen3_moe model with hidden 256, 32 experts, top-4, moe_intermediate 128,
vocab 1024, batch 4 x 256 tokens, fp32, transformers' default grouped_mm experts. A step is
forward + backward + AdamW step. Step time: median of --repeats steps after --warmup steps,
all modes in one process, interleaved. Peak step memory: CPU tensors allocated by torch during
one step, from the profiler's allocation events (torch.profiler, profile_memory=True): the
running sum of allocations minus frees over the step, maximum over the step, i.e. the memory
the step needs on top of what existed before it (weights and optimizer state included only
where they are first created, so one warm-up step is run first).

    python scripts/bench_densemixer.py [--repeats 15] [--threads 2]
"""

from __future__ import annotations

import argparse
import platform
import statistics
import time

import torch

import moe_sft
from moe_sft.densemixer import DenseMixerConfig
from moe_sft.testing import tiny_model

SHAPE = dict(
    hidden_size=256,
    num_experts=32,
    num_experts_per_tok=4,
    moe_intermediate_size=128,
    intermediate_size=512,
    num_hidden_layers=2,
    vocab_size=1024,
    num_attention_heads=4,
    num_key_value_heads=2,
    head_dim=64,
    output_router_logits=False,
)
BATCH, SEQ = 4, 256
MODES = {
    "vanilla": None,
    "fast": DenseMixerConfig(memory="fast"),
    "recompute": DenseMixerConfig(memory="recompute"),
}


def _setup(mode):
    model = tiny_model("qwen3_moe", **SHAPE).train()
    if MODES[mode] is not None:
        moe_sft.patch_model(model, moe_sft.MoESFTConfig(densemixer=MODES[mode]))
    opt = torch.optim.AdamW(model.parameters(), lr=1e-5, weight_decay=0.0)
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(3, SHAPE["vocab_size"], (BATCH, SEQ), generator=g)
    batch = {"input_ids": ids, "labels": ids}
    return model, opt, batch


def _step(model, opt, batch):
    model(**batch).loss.backward()
    opt.step()
    opt.zero_grad(set_to_none=True)


def peak_step_memory(model, opt, batch) -> int:
    """Peak bytes allocated by torch on CPU during one step (profiler allocation events)."""
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU], profile_memory=True) as prof:
        _step(model, opt, batch)
    # "[memory]" events: +bytes on allocation, -bytes on free, in time order.
    events = sorted((e.start_ns(), e.nbytes()) for e in prof.profiler.kineto_results.events() if e.name() == "[memory]")
    live = peak = 0
    for _, nbytes in events:
        live += nbytes
        peak = max(peak, live)
    return peak


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--repeats", type=int, default=15)
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)

    runs = {m: _setup(m) for m in MODES}
    for m, r in runs.items():
        for _ in range(args.warmup):
            _step(*r)
    times = {m: [] for m in MODES}
    for _ in range(args.repeats):
        for m, r in runs.items():  # interleaved, so load changes hit every mode alike
            t0 = time.perf_counter()
            _step(*r)
            times[m].append(time.perf_counter() - t0)
    mem = {m: peak_step_memory(*r) for m, r in runs.items()}

    med = {m: statistics.median(v) for m, v in times.items()}
    print(f"machine: {platform.processor() or platform.machine()}, torch {torch.__version__}, {args.threads} threads")
    print(f"shape: hidden 256, 32 experts, top-4, moe_intermediate 128, 2 layers, {BATCH}x{SEQ} tokens, fp32")
    print("| mode | step time (median of %d) | x vanilla | peak step memory | x vanilla |" % args.repeats)
    print("|---|---|---|---|---|")
    for m in MODES:
        print(
            f"| {m} | {med[m] * 1e3:.1f} ms | {med[m] / med['vanilla']:.2f} | "
            f"{mem[m] / 2**20:.1f} MiB | {mem[m] / mem['vanilla']:.2f} |"
        )


if __name__ == "__main__":
    main()
