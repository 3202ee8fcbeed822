"""`moe-sft train CONFIG.yaml [key=value ...] [--resume [CHECKPOINT]]`"""

from __future__ import annotations

import argparse


def add_parser(sub) -> None:
    p = sub.add_parser(
        "train",
        help="fine-tune an MoE model from a YAML recipe (HF Trainer + DeepSpeed ZeRO)",
        description="Train the model of CONFIG.yaml with its method blocks, data and training arguments. Launch "
        "with python/moe-sft on one process, or under deepspeed / torchrun / accelerate launch for many. "
        "The final model goes to <training.output_dir>/final; a `then:` YAML runs next from it.",
    )
    p.add_argument("config", help="train YAML (see configs/)")
    p.add_argument(
        "overrides", nargs="*", metavar="key=value", help="config overrides, e.g. training.learning_rate=1e-5 data.max_samples=100"
    )
    p.add_argument(
        "--resume",
        nargs="?",
        const=True,
        default=None,
        metavar="CHECKPOINT",
        help="continue from CHECKPOINT, or from the latest checkpoint-* in output_dir when no folder is given",
    )
    p.add_argument(
        "--overwrite",
        action="store_true",
        help="training.output_dir holds an earlier run: remove its checkpoints and final model first (without "
        "this or --resume such a folder is refused)",
    )
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from ..train.trainer import run_recipe

    finals = run_recipe(args.config, args.overrides, resume=args.resume, overwrite=args.overwrite)
    print(f"trained {len(finals)} phase(s); final model: {finals[-1]}")
    return 0
