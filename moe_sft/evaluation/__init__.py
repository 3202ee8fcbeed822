"""`moe-sft eval`: math and commonsense benchmarks in the LLM-Adapters setting, offline.

    from moe_sft.evaluation import evaluate_model
    results = evaluate_model(model, tokenizer, "gsm8k,boolq", "eval_out", limit=100)
    results["gsm8k"]["accuracy"]

- `benchmarks`: the benchmark table, prompt template, data loading and validation
- `extract`: answer extraction rules (tables: `RULES` per benchmark, `MODES` per extraction mode,
  "llm_adapters" by default, or "strict") and verdicts
- `generate`: batched generation (left padding, KV cache, greedy/beam) and log-likelihood choice
- `runner`: resumable runs, per-example JSONL, per-benchmark JSON, Markdown table
- `metrics/llm_adapters_accuracy`: the `evaluate` metric, loaded from its local path (`METRIC_PATH`)
"""

from .benchmarks import BENCHMARKS, Benchmark, DataError, Example, format_prompt, load_examples
from .extract import MODES, RULES, Rule, extract, score
from .generate import generate, loglik_choose, prepare_tokenizer
from .runner import METRIC_PATH, evaluate_model, markdown_table, prepare_benchmarks, run_eval, write_report

__all__ = [
    "BENCHMARKS",
    "METRIC_PATH",
    "MODES",
    "RULES",
    "Benchmark",
    "DataError",
    "Example",
    "Rule",
    "evaluate_model",
    "extract",
    "format_prompt",
    "generate",
    "load_examples",
    "loglik_choose",
    "markdown_table",
    "prepare_benchmarks",
    "prepare_tokenizer",
    "run_eval",
    "score",
    "write_report",
]
