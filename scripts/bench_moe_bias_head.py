"""Step-time and peak-memory overhead of the MoE-Bias head at a realistic vocabulary.

Measures the part of a training step the head touches: the output projection
h (T, H) -> logits (T, V), the head (gate, top-k, bias mix, optionally the entropy gate and
threshold update), the cross-entropy (on fp32 logits, as transformers' causal-LM loss does) plus
the weighted load-balance loss, and the backward to h and the lm_head weight (full fine-tuning)
or to h only (`--frozen-lm-head`). Variants run interleaved in one process, so the ratios
compare like with like; the decoder layers below, identical with and without the head, are left
out (they would only shrink the relative overhead).

    python scripts/bench_moe_bias_head.py --tokens 256 --vocab 151936 --hidden 2048 --reps 3 --threads 1

Step time is the process's CPU time per step (`time.process_time`), which waiting for a busy
machine's cores does not inflate; run it with --threads 1 on a shared machine. Wall-clock
medians are printed too.

Peak memory is the peak of the bytes allocated by torch's CPU allocator during one step above
what was allocated before it, from the profiler's allocation events (exact, not sampled). The
step allocates the lm_head weight gradient (V x H) afresh, in every variant alike.
"""

from __future__ import annotations

import argparse
import platform
import statistics
import time

import torch
import torch.nn.functional as F
from torch.profiler import ProfilerActivity, profile

from moe_sft.methods.moe_bias_head import MoEBiasHead, MoEBiasHeadConfig


def make_step(lm_head, head, h, labels):
    def step():
        logits = lm_head(h)  # (T, V)
        if head is not None:
            logits = head(h, logits)
        loss = F.cross_entropy(logits.float(), labels)
        if head is not None:
            loss = loss + head.config.load_balance_weight * head.last_aux_loss
        loss.backward()

    return step


def clear_grads(*modules, h):
    """Free the gradients outside the measured step, so each step allocates them afresh."""
    h.grad = None
    for m in modules:
        m.zero_grad(set_to_none=True)


def peak_step_mib(step) -> float:
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        step()
    # Allocation (+bytes) and free (-bytes) events in time order; the running sum's maximum is
    # the step's peak above its starting point.
    events = sorted(
        (e for e in prof.profiler.kineto_results.events() if e.name() == "[memory]"), key=lambda e: e.start_ns()
    )
    live = peak = 0
    for e in events:
        live += e.nbytes()
        peak = max(peak, live)
    return peak / 2**20


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--tokens", type=int, default=256)
    p.add_argument("--vocab", type=int, default=151936)
    p.add_argument("--hidden", type=int, default=2048)
    p.add_argument("--experts", type=int, default=16)
    p.add_argument("--top-k", type=int, default=2)
    p.add_argument("--reps", type=int, default=5)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--dtype", choices=["float32", "bfloat16"], default="float32")
    p.add_argument("--frozen-lm-head", action="store_true", help="no lm_head weight gradient (frozen base)")
    args = p.parse_args()

    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    dtype = getattr(torch, args.dtype)
    lm_head = torch.nn.Linear(args.hidden, args.vocab, bias=False, dtype=dtype)
    lm_head.weight.requires_grad_(not args.frozen_lm_head)
    h = torch.randn(args.tokens, args.hidden, dtype=dtype, requires_grad=True)
    labels = torch.randint(0, args.vocab, (args.tokens,))

    variants = {"no head": None}
    for apply_to in ("all", "top_entropy"):
        cfg = MoEBiasHeadConfig(num_experts=args.experts, top_k=args.top_k, apply_to=apply_to)
        head = MoEBiasHead(args.hidden, args.vocab, cfg, init_std=0.02, dtype=dtype, device="cpu").train()
        with torch.no_grad():
            head.bias.normal_(0, 0.1)  # trained-looking biases (zero biases would cost the same)
        variants[f"head, apply_to={apply_to}"] = head
    steps = {name: make_step(lm_head, head, h, labels) for name, head in variants.items()}

    modules = [lm_head, *(m for m in variants.values() if m is not None)]
    memory = {}
    for name, step in steps.items():
        clear_grads(*modules, h=h)
        step()  # warm-up (first-call overheads)
        clear_grads(*modules, h=h)
        memory[name] = peak_step_mib(step)
    times = {name: [] for name in steps}  # CPU seconds
    walls = {name: [] for name in steps}
    for _ in range(args.reps):  # interleaved, so load changes hit every variant alike
        for name, step in steps.items():
            clear_grads(*modules, h=h)
            t0, c0 = time.perf_counter(), time.process_time()
            step()
            times[name].append(time.process_time() - c0)
            walls[name].append(time.perf_counter() - t0)

    base_t, base_m = statistics.median(times["no head"]), memory["no head"]
    print(
        f"machine: {platform.machine()}, {torch.get_num_threads()} threads, torch {torch.__version__}; "
        f"T={args.tokens} tokens, H={args.hidden}, V={args.vocab}, E_b={args.experts}, k_b={args.top_k}, "
        f"{args.dtype}, lm_head {'frozen' if args.frozen_lm_head else 'trained'}, {args.reps} reps"
    )
    print(
        "| variant | CPU time per step, median (s) | min (s) | time overhead | wall median (s) "
        "| peak step memory (MiB) | memory overhead |"
    )
    print("|---|---|---|---|---|---|---|")
    for name in steps:
        t, m = statistics.median(times[name]), memory[name]
        print(
            f"| {name} | {t:.2f} | {min(times[name]):.2f} | {100 * (t / base_t - 1):+.1f}% "
            f"| {statistics.median(walls[name]):.2f} | {m:.0f} | {100 * (m / base_m - 1):+.1f}% |"
        )


if __name__ == "__main__":
    main()
