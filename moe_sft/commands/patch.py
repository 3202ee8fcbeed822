"""`moe-sft patch --model PATH_OR_HUB_ID --config CONFIG.yaml --out DIR [key=value ...]`"""

from __future__ import annotations

import argparse
import logging

logger = logging.getLogger(__name__)


def add_parser(sub) -> None:
    p = sub.add_parser(
        "patch",
        help="patch a pretrained MoE checkpoint and save it as a patched checkpoint",
        description="Load a pretrained MoE model, patch it with a moe_sft config and save the patched "
        "checkpoint (weights + moe_sft tensors + moe_sft_config.json) that moe_sft.from_pretrained restores.",
    )
    p.add_argument("--model", required=True, help="local folder or hub id of a supported MoE causal LM")
    p.add_argument("--config", help="moe_sft YAML (method blocks); omitted or {} = every method off")
    p.add_argument("--out", required=True, help="output folder (must be new or empty unless --overwrite)")
    p.add_argument("--dtype", default="auto", help="weights dtype to load and save: auto, float32, bfloat16, float16")
    p.add_argument("--overwrite", action="store_true", help="replace a non-empty --out")
    p.add_argument("overrides", nargs="*", metavar="key=value", help="config overrides, e.g. routing.disabled_experts={1: [3]}")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from pathlib import Path

    import torch
    from transformers import AutoTokenizer

    from ..pretrained import save_pretrained
    from ..config import ConfigError, apply_overrides, config_class, from_dict, load_yaml
    from ..patching import patch_model

    # Everything that can be wrong with the input is checked before loading weights.
    data = load_yaml(args.config) if args.config else {}
    config = from_dict(config_class(), apply_overrides(data, args.overrides))
    out = Path(args.out)
    if out.exists() and any(out.iterdir()) and not args.overwrite:
        raise FileExistsError(f"--out {str(out)!r} exists and is not empty; choose a new folder or pass --overwrite")
    dtype = args.dtype if args.dtype == "auto" else getattr(torch, args.dtype, None)
    if dtype is None:
        raise ConfigError(f"--dtype {args.dtype!r} is not a torch dtype (try float32 or bfloat16)")

    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(args.model, dtype=dtype)
    handle = patch_model(model, config)
    try:
        tokenizer = AutoTokenizer.from_pretrained(args.model)
    except (OSError, ValueError):
        tokenizer = None
        logger.warning("no tokenizer found at %s; saving the model without one", args.model)
    save_pretrained(model, out, tokenizer=tokenizer, overwrite=args.overwrite)
    print(f"patched {len(handle.layers)} MoE layers of {model.config.model_type}; saved to {out}")
    return 0
