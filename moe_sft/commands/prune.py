"""`moe-sft prune --model M --profile DIR --strategy S (--ratio R | --num N) [--mode mask|remove] --out DIR`"""

from __future__ import annotations

import argparse

from ._load import positive_int


def add_parser(sub) -> None:
    from ..pruning.strategies import CONTROLLABLE, STRATEGIES

    p = sub.add_parser(
        "prune",
        help="prune experts chosen from a profile: mask them (patched checkpoint) or remove them (stock checkpoint)",
        description="Choose experts to prune per MoE layer from a `moe-sft profile` folder and save the pruned model. "
        "mask: router logit -inf for the pruned experts (top-k renormalised among the survivors), saved as a "
        "patched checkpoint for moe_sft.from_pretrained. remove: a physically smaller checkpoint (router rows and "
        "expert slices removed, expert count rewritten) for stock transformers; needs the same count in every layer.",
    )
    p.add_argument("--model", required=True, help="local folder or hub id (a patched checkpoint keeps its methods in mask mode)")
    p.add_argument("--profile", required=True, help="folder written by `moe-sft profile` for this model")
    p.add_argument("--strategy", required=True, choices=STRATEGIES)
    count = p.add_mutually_exclusive_group()
    count.add_argument("--ratio", type=float, help="fraction of each layer's experts to prune")
    count.add_argument("--num", type=positive_int, help="experts to prune per layer")
    p.add_argument("--seed", type=int, default=0, help="seed of the random strategy")
    p.add_argument("--controls", choices=CONTROLLABLE, default="least_used",
                   help="random prunes as many experts per layer as this strategy (default least_used)")  # fmt: skip
    p.add_argument("--mode", choices=("mask", "remove"), default="mask")
    p.add_argument("--out", required=True, help="output folder (must be new or empty unless --overwrite)")
    p.add_argument("--dtype", default="auto", help="auto, float32, bfloat16, float16")
    p.add_argument("--overwrite", action="store_true", help="replace a non-empty --out")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from pathlib import Path

    from ..pretrained import read_saved_config
    from ..pruning.export import check_removable, export_removed
    from ..pruning.mask import save_masked
    from ..pruning.profile import ExpertProfile
    from ..pruning.strategies import describe, fraction_pruned, select_experts
    from ._load import check_out, load_model, load_tokenizer

    # The selection depends on the profile only: every count / top-k problem shows before loading weights.
    check_out(args.out, args.overwrite)
    profile = ExpertProfile.load(args.profile)
    # Experts a patched checkpoint already masks stay masked; the strategy chooses among the others.
    saved = read_saved_config(args.model) if Path(args.model).is_dir() else None
    exclude = {int(k): v for k, v in (((saved or {}).get("routing") or {}).get("disabled_experts") or {}).items()}
    selection = select_experts(profile, args.strategy, ratio=args.ratio, num=args.num, seed=args.seed, controls=args.controls,
                               exclude=exclude)  # fmt: skip
    tokenizer = load_tokenizer(args.model)
    model = load_model(args.model, args.dtype)
    profile.check_matches(model)
    metadata = {
        "model": args.model,
        "profile": args.profile,
        "strategy": args.strategy,
        "ratio": args.ratio,
        "num": args.num,
        "seed": args.seed if args.strategy == "random" else None,
        "controls": args.controls if args.strategy == "random" else None,
        "fraction_pruned": fraction_pruned(profile, selection),
    }
    if args.mode == "remove":
        check_removable(model, selection)
        export_removed(model, selection, args.out, tokenizer=tokenizer, metadata=metadata, overwrite=args.overwrite)
    else:
        save_masked(model, selection, args.out, tokenizer=tokenizer, metadata=metadata, overwrite=args.overwrite)
    print(f"{args.strategy}: pruned {describe(selection)} ({args.mode}); saved to {args.out}")
    return 0
