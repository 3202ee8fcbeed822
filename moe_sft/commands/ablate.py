"""`moe-sft ablate CONFIG.yaml [key=value ...]`"""

from __future__ import annotations

import argparse


def add_parser(sub) -> None:
    p = sub.add_parser(
        "ablate",
        help="grid of pruning strategies x ratios x seeds, each evaluated on benchmarks (resumable)",
        description="Profile (or read a profile), then for every cell of the grid mask the chosen experts in the "
        "loaded model and evaluate it (as `moe-sft eval`). Writes ablation.csv, ablation.md (random as mean ± std "
        "over seeds) and ablation.png; rerunning with the same `out` skips finished cells.",
    )
    p.add_argument("config", help="ablation YAML (see configs/tiny/ablate_qwen3_moe.yaml)")
    p.add_argument("overrides", nargs="*", metavar="key=value", help="config overrides, e.g. limit=20 seeds=[0,1]")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from ..pruning.ablate import load_config, run_ablation

    print(run_ablation(load_config(args.config, args.overrides)))
    return 0
