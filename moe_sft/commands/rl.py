"""`moe-sft rl CONFIG.yaml [key=value ...] [--resume [CHECKPOINT]] [--overwrite]`"""

from __future__ import annotations

import argparse


def add_parser(sub) -> None:
    p = sub.add_parser(
        "rl",
        help="RL for MoE models from a YAML recipe (TRL GRPO, verifiable rewards, routing replay)",
        description="Train the model of CONFIG.yaml with GRPO on its prompts and rewards, with its method blocks and "
        "routing replay. Launch with python/moe-sft on one process, or under deepspeed / torchrun / accelerate launch "
        "for many. The final model goes to <grpo.output_dir>/final (see docs/rl.md).",
    )
    p.add_argument("config", help="RL YAML (see configs/*/*grpo*.yaml)")
    p.add_argument(
        "overrides", nargs="*", metavar="key=value", help="config overrides, e.g. grpo.learning_rate=1e-6 routing_replay=none"
    )
    p.add_argument(
        "--resume",
        nargs="?",
        const=True,
        default=None,
        metavar="CHECKPOINT",
        help="continue from CHECKPOINT, or from the latest checkpoint-* in grpo.output_dir when no folder is given",
    )
    p.add_argument(
        "--overwrite",
        action="store_true",
        help="grpo.output_dir holds an earlier run: remove its checkpoints and final model first (without this or "
        "--resume such a folder is refused)",
    )
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from ..rl.recipe import run_rl

    result = run_rl(args.config, args.overrides, resume=args.resume, overwrite=args.overwrite)
    print(f"final model: {result.final_dir}")
    return 0
