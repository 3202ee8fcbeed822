"""`moe-sft profile --model M --data FILE [--limit N] --out DIR`"""

from __future__ import annotations

import argparse

from ._load import positive_int


def add_parser(sub) -> None:
    p = sub.add_parser(
        "profile",
        help="per-layer expert usage, gate mass and max |expert output| over a data file",
        description="Run a data file through a (stock or patched) MoE checkpoint and record, per MoE layer and expert, "
        "token counts, gate-weight mass, router-score mass and max |expert output| (down_proj output before gate "
        "weighting, for super experts). Writes profile.json, usage_heatmap.png and cumulative_usage.png.",
    )
    p.add_argument("--model", required=True, help="local folder or hub id (patched checkpoints are profiled as patched)")
    p.add_argument("--data", required=True, help="a data file, folder or hub id in any format moe-sft train reads (docs/data.md), or {\"text\": ...} records")
    p.add_argument("--limit", type=positive_int, help="first N records")
    p.add_argument("--out", required=True, help="output folder (must be new or empty unless --overwrite)")
    p.add_argument("--batch-size", type=positive_int, default=8)
    p.add_argument("--max-length", type=positive_int, default=1024, help="texts are truncated to this many tokens")
    p.add_argument("--dtype", default="auto", help="auto, float32, bfloat16, float16")
    p.add_argument("--overwrite", action="store_true", help="replace a non-empty --out")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from ..pruning.profile import profile_model, read_texts, write_profile
    from ..pruning.strategies import super_experts
    from ._load import check_out, load_model, load_tokenizer

    check_out(args.out, args.overwrite)
    tokenizer = load_tokenizer(args.model)
    texts = read_texts(args.data, tokenizer, limit=args.limit)
    model = load_model(args.model, args.dtype)
    profile = profile_model(model, tokenizer, texts, batch_size=args.batch_size, max_length=args.max_length,
                            model_id=args.model, data=args.data)  # fmt: skip
    write_profile(profile, args.out, overwrite=args.overwrite)
    found = {layer: ids for layer, ids in super_experts(profile).items() if ids}
    print(f"profiled {len(profile.layers)} MoE layers x {profile.num_experts} experts on {profile.tokens} tokens "
          f"({profile.texts} texts); super experts: {found or 'none'}; wrote {args.out}")  # fmt: skip
    return 0
