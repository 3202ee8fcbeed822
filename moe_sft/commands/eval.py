"""`moe-sft eval --model M [--model M2 ...] --benchmarks math,commonsense --out DIR`"""

from __future__ import annotations

import argparse

from ..config import ConfigError


def _data_spec(text: str) -> tuple[str, str]:
    name, sep, source = text.partition("=")
    if not sep or not name or not source:
        raise argparse.ArgumentTypeError(f"{text!r}: expected NAME=PATH_OR_HUB_ID, e.g. hellaswag=data/hellaswag/test.json")
    return name, source


def add_parser(sub) -> None:
    p = sub.add_parser(
        "eval",
        help="accuracy on math / commonsense benchmarks (LLM-Adapters setting)",
        description="Evaluate stock or patched checkpoints on GSM8K, SVAMP, MAWPS, AQuA, AddSub, MultiArith, "
        "SingleEq, BoolQ, PIQA, SIQA, HellaSwag, WinoGrande, ARC-e, ARC-c, OBQA with LLM-Adapters' prompt and "
        "answer extraction. Writes per-example JSONL, per-benchmark JSON and a Markdown table; rerunning with "
        "the same --out resumes.",
    )
    p.add_argument("--model", action="append", required=True, help="local folder or hub id; repeat for a side-by-side table")
    p.add_argument("--benchmarks", default="math,commonsense", help="comma list of benchmarks and/or groups (math, commonsense)")
    p.add_argument("--out", required=True, help="output folder (reused to resume)")
    p.add_argument("--data", action="append", type=_data_spec, default=[], metavar="NAME=PATH_OR_HUB_ID",
                   help="data for one benchmark: an LLM-Adapters JSON/JSONL file, a folder with test.json, or a hub id")  # fmt: skip
    p.add_argument("--data-dir", help="an LLM-Adapters dataset/ folder (<dir>/<Benchmark>/test.json)")
    p.add_argument("--split", default="test", help="split for hub datasets (default test)")
    p.add_argument("--limit", type=int, help="first N examples of each benchmark")
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--max-new-tokens", type=int, help="default: 256 for math, 32 for commonsense (as LLM-Adapters)")
    p.add_argument("--num-beams", type=int, default=1, help="1 = greedy (default); LLM-Adapters used 4")
    p.add_argument("--scoring", choices=("generate", "loglik"), default="generate",
                   help="loglik: log-likelihood multiple choice for the commonsense sets (a different protocol)")  # fmt: skip
    p.add_argument("--extraction", choices=("llm_adapters", "strict"), default="llm_adapters",
                   help="llm_adapters (default): read answers exactly as LLM-Adapters' scripts, quirks included, so "
                   "numbers compare with papers; strict: standalone AQuA letters (the last one), whole commonsense words in any case")  # fmt: skip
    p.add_argument("--adapter", help="a MoE-Bias head adapter folder (moe_sft.save_moe_bias_adapter) loaded onto every --model")
    p.add_argument("--dtype", default="auto", help="auto, float32, bfloat16, float16")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from ..evaluation import run_eval

    data = dict(args.data)
    if len(data) != len(args.data):
        raise ConfigError(f"--data names a benchmark twice: {[name for name, _ in args.data]}")
    table = run_eval(
        args.model, args.benchmarks, args.out, dtype=args.dtype, adapter=args.adapter, data=data, data_dir=args.data_dir,
        split=args.split, limit=args.limit, batch_size=args.batch_size, max_new_tokens=args.max_new_tokens,
        num_beams=args.num_beams, scoring=args.scoring, extraction=args.extraction,
    )  # fmt: skip
    print(table)
    return 0
