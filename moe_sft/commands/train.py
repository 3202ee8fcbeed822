"""`moe-sft train CONFIG.yaml [key=value ...] [--resume [CHECKPOINT] | --dry-run [--world-size N] [--json]]`"""

from __future__ import annotations

import argparse

from ._load import add_recipe_arguments


def add_parser(sub) -> None:
    p = sub.add_parser(
        "train",
        help="fine-tune an MoE model from a YAML recipe (HF Trainer + DeepSpeed ZeRO)",
        description="Train the model of CONFIG.yaml with its method blocks, data and training arguments. Launch "
        "with python/moe-sft on one process, or under deepspeed / torchrun / accelerate launch for many. "
        "The final model goes to <training.output_dir>/final; a `then:` YAML runs next from it.",
    )
    add_recipe_arguments(p, "training.output_dir", "training.learning_rate=1e-5 data.max_samples=100")
    p.add_argument(
        "--dry-run",
        action="store_true",
        help="check the whole job and print its plan (parameters, per-rank memory, data) without loading a weight or "
        "writing anything; docs/scale.md",
    )
    p.add_argument("--world-size", type=int, metavar="N", help="--dry-run: plan for N ranks (default: WORLD_SIZE, else 1)")
    p.add_argument("--json", action="store_true", help="--dry-run: print the plan as JSON (redirect it to keep it)")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from ..config import ConfigError

    if args.dry_run and (args.resume is not None or args.overwrite):
        raise ConfigError("--dry-run trains nothing and writes nothing: drop --resume / --overwrite")
    if not args.dry_run and (args.world_size is not None or args.json):
        raise ConfigError("--world-size and --json describe a plan: add --dry-run")
    if args.dry_run:
        from ..train.plan import dry_run

        return dry_run(args.config, args.overrides, world_size=args.world_size, as_json=args.json)
    from ..train.trainer import run_recipe

    finals = run_recipe(args.config, args.overrides, resume=args.resume, overwrite=args.overwrite)
    print(f"trained {len(finals)} phase(s); final model: {finals[-1]}")
    return 0
