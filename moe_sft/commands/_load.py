"""Model / tokenizer loading, argument types and output checks shared by the verbs."""

from __future__ import annotations

import argparse
from pathlib import Path

from ..config import ConfigError


def positive_int(text: str) -> int:
    """argparse type: a whole number >= 1 (refused at parse time, before any work)."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a whole number") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"{value} must be at least 1")
    return value


def check_out(out: str, overwrite: bool) -> None:
    path = Path(out)
    if path.exists() and (not path.is_dir() or any(path.iterdir())) and not overwrite:
        raise FileExistsError(f"--out {out!r} exists and is not empty; choose a new folder or pass --overwrite")


def load_tokenizer(model: str):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(model)


def load_model(model: str, dtype: str):
    """A stock or patched (restored as saved) checkpoint, on the GPU(s) when there are any."""
    import torch

    from ..pretrained import from_pretrained

    torch_dtype = dtype if dtype == "auto" else getattr(torch, dtype, None)
    if not isinstance(torch_dtype, (str, torch.dtype)):
        raise ConfigError(f"--dtype {dtype!r} is not a torch dtype (try auto, float32 or bfloat16)")
    placement = {"device_map": "auto"} if torch.cuda.is_available() else {}
    return from_pretrained(model, dtype=torch_dtype, **placement).eval()


def add_recipe_arguments(p: argparse.ArgumentParser, output_dir: str, example: str) -> None:
    """CONFIG, key=value overrides, --resume and --overwrite: what every recipe verb takes.
    `output_dir` names the YAML key of the run's folder (e.g. training.output_dir)."""
    p.add_argument("config", help="recipe YAML (see configs/)")
    p.add_argument("overrides", nargs="*", metavar="key=value", help=f"config overrides, e.g. {example}")
    p.add_argument(
        "--resume",
        nargs="?",
        const=True,
        default=None,
        metavar="CHECKPOINT",
        help=f"continue from CHECKPOINT, or from the latest complete checkpoint-* in {output_dir} when no folder is given",
    )
    p.add_argument(
        "--overwrite",
        action="store_true",
        help=f"{output_dir} holds an earlier run: remove its checkpoints and final model first (without this or "
        "--resume such a folder is refused)",
    )
