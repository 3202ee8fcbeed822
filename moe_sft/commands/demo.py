"""`moe-sft demo [--quick] [--out DIR] [--threads N] [--seeds N] [--rl-seeds N] [--seed S]`"""

from __future__ import annotations

import argparse


def add_parser(sub) -> None:
    p = sub.add_parser(
        "demo",
        help="pre-train a small MoE on a synthetic corpus and compare every method on it, over seeds (CPU, ~5 min)",
        description="Build a small Qwen3-MoE and a character-level tokenizer, pre-train it on nine synthetic skills "
        "at long-tailed frequencies, study its long tail of experts, fine-tune it on a rare skill with every method "
        "(through `moe-sft train`) over several seeds, test whether each fine-tuned model's long tail of experts can "
        "be masked at less cost than random experts, fine-tune the same skill with GRPO (exact-match reward, through "
        "`moe-sft rl`) with and without the forking-token mask and routing replay, and write tables and plots. "
        "Budgets are optimizer steps, so "
        "the numbers do not depend on the machine's speed or load. Nothing is downloaded.",
    )
    p.add_argument("--out", default="outputs/demo", help="output folder (a previous demo output there is replaced)")
    p.add_argument("--quick", action="store_true", help="a much shorter run, as the tests use")
    p.add_argument("--threads", type=int, default=1,
                   help="torch CPU threads (default 1; the numbers are reproducible for a given thread count)")
    p.add_argument("--seeds", type=int, default=None,
                   help="fine-tuning seeds per method (default 3; 2 with --quick); more seeds, a finer noise estimate")
    p.add_argument("--rl-seeds", type=int, default=None,
                   help="GRPO seeds per RL arm (default 2; 1 with --quick; the no-replay arm runs one)")
    p.add_argument("--seed", type=int, default=0, help="base seed of corpus, initialisation and fine-tuning seeds (default 0)")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from ..demo import run_demo

    run_demo(args.out, quick=args.quick, threads=args.threads, seeds=args.seeds, seed=args.seed, rl_seeds=args.rl_seeds)
    return 0
