"""`moe-sft <verb>`: a thin dispatcher. Each verb lives in `moe_sft/commands/<verb>.py` with
`add_parser(subparsers)` and `run(args)`; heavy imports happen inside `run`.

Launching on many GPUs is left to `deepspeed` / `torchrun` / `accelerate launch`.
"""

from __future__ import annotations

import argparse
import importlib
import logging
import sys

# verb -> module under moe_sft.commands, in the order `--help` lists them
VERBS = ("demo", "patch", "train", "eval", "profile", "prune", "ablate")


def build_parser() -> argparse.ArgumentParser:
    from . import __version__

    parser = argparse.ArgumentParser(
        prog="moe-sft",
        description="MoE-aware fine-tuning for Hugging Face Mixture-of-Experts models.",
    )
    parser.add_argument("--version", action="version", version=f"moe-sft {__version__}")
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    # The `deepspeed` launcher passes --local_rank=N before the verb; ranks are read from LOCAL_RANK.
    parser.add_argument("--local_rank", "--local-rank", type=int, default=None, help=argparse.SUPPRESS)
    sub = parser.add_subparsers(dest="verb", metavar="VERB")
    sub.required = True
    for verb in VERBS:
        importlib.import_module(f"moe_sft.commands.{verb}").add_parser(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        datefmt="%H:%M:%S",
    )
    from .adapters import PatchError
    from .checkpoint import CheckpointError
    from .config import ConfigError

    try:
        return int(args.func(args) or 0)
    except (ConfigError, PatchError, CheckpointError, FileExistsError, FileNotFoundError) as e:
        print(f"moe-sft {args.verb}: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
