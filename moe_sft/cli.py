"""`moe-sft <verb>`: a thin dispatcher. Each verb lives in `moe_sft/commands/<verb>.py` with
`add_parser(subparsers)` and `run(args)`; heavy imports happen inside `run`.

Launching on many GPUs is left to `deepspeed` / `torchrun` / `accelerate launch`.
Bad input (moe_sft's own errors) ends with one line `moe-sft VERB: error: ...` and exit status 2;
Ctrl-C with one line saying what was kept and how to go on, and exit status 130.
"""

from __future__ import annotations

import argparse
import importlib
import logging
import sys

logger = logging.getLogger(__name__)

# verb -> module under moe_sft.commands, in the order `--help` lists them
VERBS = ("demo", "patch", "train", "rl", "eval", "profile", "prune", "ablate")


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


# What an interrupted verb has kept and how to go on: the one line Ctrl-C prints (fields of the
# verb's arguments are filled in).
ON_INTERRUPT = {
    "demo": "nothing usable is kept; rerun `moe-sft demo --out {out}` to start over",
    "patch": "nothing was written to {out}; rerun the same command",
    "train": "kept the checkpoint-N folders saved so far in training.output_dir (none before the first save); "
    "continue with `moe-sft train {config} ... --resume`",
    "rl": "kept the checkpoint-N folders saved so far in grpo.output_dir (none before the first save); continue "
    "with `moe-sft rl {config} ... --resume`",
    "eval": "kept the finished examples in {out}; rerun with the same --out to continue from there",
    "profile": "nothing was written to {out}; rerun the same command",
    "prune": "nothing was written to {out}; rerun the same command",
    "ablate": "kept the finished cells and examples in the config's `out`; rerun `moe-sft ablate {config} ...` to "
    "continue from there",
}
EXIT_INTERRUPTED = 130  # 128 + SIGINT, as shells report it
EXIT_USER_ERROR = 2  # as argparse uses for bad arguments


def is_user_error(error: BaseException) -> bool:
    """moe_sft's own error classes (ConfigError and its subclasses, PatchError, CheckpointError,
    ...), missing or existing files, and malformed YAML: bad input, reported in one line."""
    import yaml

    own = any(cls.__module__.split(".")[0] == "moe_sft" for cls in type(error).__mro__)
    return own or isinstance(error, (FileExistsError, FileNotFoundError, yaml.YAMLError))


def _process_group_initialized() -> bool:
    torch = sys.modules.get("torch")  # not imported yet: there is no process group (and --help stays light)
    return torch is not None and torch.distributed.is_available() and torch.distributed.is_initialized()


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        datefmt="%H:%M:%S",
    )
    # A process group the verb started (the Trainer's, under torchrun / deepspeed / accelerate) is
    # destroyed when it ends, as PyTorch asks: left to interpreter exit, its worker threads are torn
    # down during finalisation, where they can crash a job that has already succeeded.
    owns_process_group = not _process_group_initialized()
    try:
        return int(args.func(args) or 0)
    except KeyboardInterrupt:
        print(f"moe-sft {args.verb}: interrupted; {ON_INTERRUPT[args.verb].format(**vars(args))}", file=sys.stderr)
        return EXIT_INTERRUPTED
    except Exception as e:
        if not is_user_error(e):
            raise
        logger.debug("moe-sft %s failed", args.verb, exc_info=True)  # the traceback, with --verbose
        one_line = " ".join(line.strip() for line in str(e).splitlines())
        print(f"moe-sft {args.verb}: error: {one_line}", file=sys.stderr)
        return EXIT_USER_ERROR
    finally:
        if owns_process_group and _process_group_initialized():
            sys.modules["torch"].distributed.destroy_process_group()


if __name__ == "__main__":
    sys.exit(main())
