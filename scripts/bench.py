"""The benchmark suite: run the benchmark scripts and rewrite their sections of BENCHMARKS.md.

    python scripts/bench.py                      # everything (CPU ~40 min on 2 cores; GPU section if CUDA)
    python scripts/bench.py --quick              # fewer repeats (a few minutes)
    python scripts/bench.py --only patch,gpu     # some benchmarks

Each benchmark runs in its own process (its ratios are measured within that one process, the
variants interleaved step by step, medians of repeated runs) and prints a Markdown table; this
script writes one section per benchmark with the exact command, the machine and that output.
A section is recognised by the script name in its `## ` heading: rerunning a benchmark replaces
its section (hand-written or generated), other sections are kept, new ones are appended.
Without CUDA the GPU section says it was not run. The file is written atomically.
"""

from __future__ import annotations

import argparse
import os
import platform
import re
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


@dataclass(frozen=True)
class Bench:
    key: str
    script: str
    title: str
    runs: tuple[tuple[str, ...], ...]  # one command line per run; each prints its own table
    quick_runs: tuple[tuple[str, ...], ...]
    note: str  # what is measured and the target, printed above the numbers


BENCHES = (
    Bench("patch", "bench_patch.py", "Patch overhead and grouped_mm vs eager",
          (("--repeats", "15"),), (("--repeats", "5", "--seq", "128"),),
          "Step = forward + backward, hidden 256, 32 experts, top-4, moe_intermediate 256, fp32. `patched / stock`: "
          "the patched model with every method off against the stock model (target ≤ 1.03). `eager / grouped_mm`: "
          "the patched forward with eager experts against grouped_mm (the patch keeps transformers' fast path)."),
    Bench("condenser", "bench_condenser.py", "Condenser step time",
          (("--runs", "15", "--threads", "1", "--moe-intermediate", "128"),
           ("--runs", "15", "--threads", "1", "--moe-intermediate", "256")),
          (("--runs", "5", "--threads", "1", "--moe-intermediate", "128"),),
          "Condenser variants (router bias + r = 2 long-tail condensers) against stock; targets: compute_neutral "
          "≤ 1.10×, additive (k = 4, r = 2) ≤ 1.30×."),
    Bench("densemixer", "bench_densemixer.py", "DenseMixer step time and memory",
          (("--repeats", "7", "--warmup", "1", "--threads", "1"),), (("--repeats", "3", "--warmup", "1", "--threads", "1"),),
          "DenseMixer (both memory modes) against vanilla, step time and peak step memory; targets: fast ≤ 2.0× "
          "step time, recompute ≤ 1.3× step memory."),
    Bench("moe_bias_head", "bench_moe_bias_head.py", "MoE-Bias head overhead",
          (("--tokens", "256", "--vocab", "151936", "--hidden", "2048", "--reps", "5", "--threads", "1"),),
          (("--tokens", "128", "--vocab", "151936", "--hidden", "2048", "--reps", "2", "--threads", "1"),),
          "The MoE-Bias head against none at a real vocabulary (151,936) and hidden size (2048)."),
    Bench("zero3_memory", "bench_zero3_memory.py", "ZeRO-3 partitioned loading: peak RSS per rank",
          (("--sizes", "50,200,500"),), (("--sizes", "50",),),
          "Peak host RSS per rank above the pre-load level, loading (load + patch) and training (2 SGD steps, "
          "condenser bias on), CPU fp32 gloo, the checkpoint loaded whole before the DeepSpeed config (`whole`) against "
          "transformers' zero.Init loading that `moe-sft train` uses (`partitioned`). Target: rank 1's partitioned "
          "load peak at world size 2 <= 0.6x the world-size-1 load peak; rank 0 reads the checkpoint."),
    Bench("rl", "bench_rl.py", "GRPO step with routing replay, and generation speed",
          (("--steps", "15", "--warmup", "2", "--threads", "1"),), (("--steps", "5", "--warmup", "1", "--threads", "1"),),
          "A GRPO step (TRL, HF generate) with routing_replay: rollout against none (goal <= 1.03x), and generation "
          "tokens/s of the patched model against stock (goal <= 1.05x time), interleaved in one process."),
    Bench("gpu", "bench_gpu.py", "GPU: Qwen3-30B-A3B-shaped slice",
          (("--layers", "4", "--batch", "8", "--seq", "2048", "--repeats", "10"),),
          (("--layers", "2", "--batch", "4", "--seq", "2048", "--repeats", "5"),),
          "Real hidden size 2048, 128 experts, top-8, moe_intermediate 768, vocabulary 151,936, a few layers, bf16, "
          "forward + backward: tokens/s and model FLOPs utilisation (formula in the script's docstring), stock vs "
          "patched (every method off) vs patched with eager experts."),
)


def machine() -> str:
    import torch

    cpu = platform.processor() or platform.machine()
    try:
        model = next(line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo") if line.startswith("model name"))
        cpu = model
    except (OSError, StopIteration):
        pass
    load = ", ".join(f"{x:.1f}" for x in os.getloadavg())
    gpu = f", GPU {torch.cuda.get_device_name()}" if torch.cuda.is_available() else ""
    import transformers

    return (f"{os.cpu_count()}-core {cpu} ({platform.machine()}){gpu}, torch {torch.__version__}, transformers "
            f"{transformers.__version__}, Python {platform.python_version()}; load average at start {load}")  # fmt: skip


def as_markdown(stdout: str) -> str:
    """A script's output as Markdown: its "# ..." header lines are text, not headings, and a
    table gets a blank line before it."""
    out: list[str] = []
    for line in stdout.strip().splitlines():
        line = line[2:] if line.startswith("# ") else line
        if line.startswith("|") and out and out[-1] and not out[-1].startswith("|"):
            out.append("")
        out.append(line)
    return "\n".join(out)


def run_bench(b: Bench, quick: bool) -> str:
    """One section: heading, note, then per command line: the command, the machine and the
    script's output (or why it was not run)."""
    import torch

    section = f"## {b.title} (`scripts/{b.script}`)\n\n{b.note} Run by `python scripts/bench.py{' --quick' if quick else ''}`.\n"
    for args in b.quick_runs if quick else b.runs:
        command = " ".join(["python", f"scripts/{b.script}", *args])
        section += f"\nCommand: `{command}`\n"
        if b.key == "gpu" and not torch.cuda.is_available():
            section += "\nNot run: no GPU on this machine (`torch.cuda.is_available()` is False).\n"
            continue
        print(f"[bench] {command}", file=sys.stderr, flush=True)
        load = machine()  # before the run: the load average it started under
        t0 = time.perf_counter()
        proc = subprocess.run([sys.executable, str(ROOT / "scripts" / b.script), *args], cwd=ROOT, capture_output=True, text=True)
        took = time.perf_counter() - t0
        if proc.returncode != 0:
            tail = "\n".join(proc.stderr.strip().splitlines()[-15:])
            section += f"\nFailed (exit {proc.returncode}) after {took:.0f} s:\n\n```\n{tail}\n```\n"
        else:
            section += f"\nMachine: {load}; took {took:.0f} s.\n\n{as_markdown(proc.stdout)}\n"
    return section


def replace_sections(text: str, sections: dict[str, str]) -> str:
    """Replace each `## ` section whose heading names `scripts/<script>` by the new one; append the rest."""
    parts = re.split(r"(?m)^(?=## )", text)
    head, body = parts[0], parts[1:]
    done = set()
    out = []
    for part in body:
        heading = part.splitlines()[0]
        script = next((s for s in sections if f"scripts/{s}" in heading), None)
        if script is None:
            out.append(part.rstrip("\n") + "\n\n")
        elif script not in done:  # the first section of a script is replaced, later duplicates dropped
            out.append(sections[script].rstrip("\n") + "\n\n")
            done.add(script)
    out += [sections[s].rstrip("\n") + "\n\n" for s in sections if s not in done]
    return (head if head.strip() else "# Benchmarks\n\n") + "".join(out).rstrip("\n") + "\n"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="fewer repeats and smaller shapes")
    ap.add_argument("--only", default=",".join(b.key for b in BENCHES), help="comma-separated: " + ", ".join(b.key for b in BENCHES))
    ap.add_argument("--out", default=str(ROOT / "BENCHMARKS.md"))
    args = ap.parse_args()
    keys = args.only.split(",")
    unknown = sorted(set(keys) - {b.key for b in BENCHES})
    if unknown:
        ap.error(f"unknown benchmark(s) {unknown}; choose from {[b.key for b in BENCHES]}")
    sections = {b.script: run_bench(b, args.quick) for b in BENCHES if b.key in keys}
    out = Path(args.out)
    text = replace_sections(out.read_text() if out.exists() else "", sections)
    tmp = out.with_name(f".{out.name}.tmp")
    tmp.write_text(text)
    os.replace(tmp, out)
    print(f"[bench] wrote {', '.join(sections)} to {out}", file=sys.stderr)


if __name__ == "__main__":
    main()
