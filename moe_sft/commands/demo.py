"""`moe-sft demo [--quick] [--out DIR]`"""

from __future__ import annotations

import argparse


def add_parser(sub) -> None:
    p = sub.add_parser(
        "demo",
        help="pre-train a small MoE on a synthetic corpus and compare every method on it (CPU, ~6 min)",
        description="Build a small Qwen3-MoE and a character-level tokenizer, pre-train it on nine synthetic skills "
        "at long-tailed frequencies, profile and prune its experts, fine-tune it on a rare skill with every method "
        "(through `moe-sft train`), and write a table and plots. Nothing is downloaded.",
    )
    p.add_argument("--out", default="outputs/demo", help="output folder (a previous demo output there is replaced)")
    p.add_argument("--quick", action="store_true", help="a much shorter run (under a minute), as the tests use")
    p.add_argument("--threads", type=int, default=1,
                   help="torch CPU threads (default 1: the matrices are small; more threads mostly contend on a shared CPU)")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from ..demo import run_demo

    run_demo(args.out, quick=args.quick, threads=args.threads)
    return 0
