"""`moe-sft rl CONFIG.yaml [key=value ...] [--resume [CHECKPOINT]] [--overwrite]`"""

from __future__ import annotations

import argparse

from ._load import add_recipe_arguments


def add_parser(sub) -> None:
    p = sub.add_parser(
        "rl",
        help="RL for MoE models from a YAML recipe (TRL GRPO, verifiable rewards, routing replay)",
        description="Train the model of CONFIG.yaml with GRPO on its prompts and rewards, with its method blocks and "
        "routing replay. Launch with python/moe-sft on one process, or under deepspeed / torchrun / accelerate launch "
        "for many. The final model goes to <grpo.output_dir>/final (see docs/rl.md).",
    )
    add_recipe_arguments(p, "grpo.output_dir", "grpo.learning_rate=1e-6 routing_replay=none")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from ..rl.recipe import run_rl

    result = run_rl(args.config, args.overrides, resume=args.resume, overwrite=args.overwrite)
    print(f"final model: {result.final_dir}")
    return 0
