"""Benchmark DenseMixer (fast / recompute) against a vanilla training step.

Shape: a 2-layer qwen3_moe model with hidden 256, 32 experts, top-4, moe_intermediate 128,
vocab 1024, batch 4 x 256 tokens, fp32, transformers' default grouped_mm experts. A step is
forward + backward + AdamW step. All modes run on ONE model instance and optimizer: before each
step the mode is patched onto the model and after it reverted (outside the timed region), and
the modes take turns step by step, so load changes on a shared machine hit every mode alike.
Step time: median of --repeats steps per mode after --warmup rounds. Peak step memory: CPU
tensors allocated by torch during one step, from the profiler's allocation events
(torch.profiler, profile_memory=True): the running sum of allocations minus frees over the
step, maximum over the step, i.e. the memory the step needs on top of what existed before it
(weights and the optimizer state from the warm-up already exist, so they do not count).

    python scripts/bench_densemixer.py [--repeats 21] [--threads 1] [--chunk-tokens 512]
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import time

import torch

import moe_sft
from moe_sft.methods.densemixer import DenseMixerConfig
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
MODES = ("vanilla", "fast", "recompute")


def _setup():
    model = tiny_model("qwen3_moe", **SHAPE).train()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-5, weight_decay=0.0)
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(3, SHAPE["vocab_size"], (BATCH, SEQ), generator=g)
    batch = {"input_ids": ids, "labels": ids}
    return model, opt, batch


def _config(mode: str, chunk_tokens: int) -> moe_sft.MoESFTConfig:
    if mode == "vanilla":
        return moe_sft.MoESFTConfig()  # no method: the stock forward and gradient
    return moe_sft.MoESFTConfig(densemixer=DenseMixerConfig(memory=mode, chunk_tokens=chunk_tokens))


def _step(model, opt, batch):
    model(**batch).loss.backward()
    opt.step()
    opt.zero_grad(set_to_none=True)


def timed_step(setup, config) -> float:
    model, opt, batch = setup
    handle = moe_sft.patch_model(model, config) if config.densemixer is not None else None
    t0 = time.perf_counter()
    _step(model, opt, batch)
    dt = time.perf_counter() - t0
    if handle is not None:
        handle.revert()
    return dt


def peak_step_memory(setup, config) -> int:
    """Peak bytes allocated by torch on CPU during one step (profiler allocation events)."""
    model, opt, batch = setup
    handle = moe_sft.patch_model(model, config) if config.densemixer is not None else None
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU], profile_memory=True) as prof:
        _step(model, opt, batch)
    if handle is not None:
        handle.revert()
    # "[memory]" events: +bytes on allocation, -bytes on free, in time order.
    events = sorted((e.start_ns(), e.nbytes()) for e in prof.profiler.kineto_results.events() if e.name() == "[memory]")
    live = peak = 0
    for _, nbytes in events:
        live += nbytes
        peak = max(peak, live)
    return peak


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--repeats", type=int, default=21)
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--chunk-tokens", type=int, default=DenseMixerConfig.chunk_tokens)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)

    setup = _setup()
    configs = {m: _config(m, args.chunk_tokens) for m in MODES}
    load_before = os.getloadavg()
    for _ in range(args.warmup):
        for m in MODES:
            timed_step(setup, configs[m])
    times = {m: [] for m in MODES}
    for _ in range(args.repeats):
        for m in MODES:  # interleaved, so load changes hit every mode alike
            times[m].append(timed_step(setup, configs[m]))
    load_after = os.getloadavg()
    mem = {m: peak_step_memory(setup, configs[m]) for m in MODES}

    med = {m: statistics.median(v) for m, v in times.items()}
    print(f"machine: {platform.processor() or platform.machine()}, {os.cpu_count()} cores, torch {torch.__version__}, "
          f"{args.threads} threads; load average (1 min) {load_before[0]:.2f} before, {load_after[0]:.2f} after timing")
    print(f"shape: hidden 256, 32 experts, top-4, moe_intermediate 128, 2 layers, {BATCH}x{SEQ} tokens, fp32, "
          f"densemixer.chunk_tokens {args.chunk_tokens}")
    print("| mode | step time (median of %d) | x vanilla | peak step memory | x vanilla |" % args.repeats)
    print("|---|---|---|---|---|")
    for m in MODES:
        print(
            f"| {m} | {med[m] * 1e3:.1f} ms | {med[m] / med['vanilla']:.2f} | "
            f"{mem[m] / 2**20:.1f} MiB | {mem[m] / mem['vanilla']:.2f} |"
        )


if __name__ == "__main__":
    main()
