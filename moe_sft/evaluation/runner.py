"""Evaluation runs: data first, then per model x benchmark predictions (resumable), then tables.

Output folder layout (`out/`):

    results.md               side-by-side Markdown table, one column per model
    results.json             the same numbers
    <model>/<bench>.jsonl    one line per example, appended as batches finish
    <model>/<bench>.json     settings, then (when the benchmark is complete) accuracy

Rerunning with the same `out/` skips the examples already in the JSONL files; a run asking
for different settings than the ones a JSONL was written with is refused.
"""

from __future__ import annotations

import functools
import gc
import json
import logging
import os
import re
from pathlib import Path
from typing import Literal

from ..config import ConfigError
from ..io import atomic_write_text
from .benchmarks import BENCHMARKS, GROUPS, Benchmark, DataError, Example, expand, load_examples, resolve_source
from .extract import DEFAULT_MODE, Mode, check_mode, score

logger = logging.getLogger(__name__)

METRIC_PATH = str(Path(__file__).resolve().parent / "metrics" / "llm_adapters_accuracy")
Scoring = Literal["generate", "loglik"]
PROTOCOL_NOTES = {
    "generate": "generation (greedy or beam), answers read exactly as LLM-Adapters' scripts read them "
    "(unless marked `strict`)",
    "loglik": "log-likelihood multiple choice over the answer words; NOT LLM-Adapters' protocol, "
    "numbers are not comparable with generation results",
}
# protocol label suffix -> note, for extraction modes other than the default
EXTRACTION_NOTES = {
    "strict": "stricter answer extraction (AQuA: the last standalone capital A-E; commonsense: the first "
    "whole answer word, any case); NOT LLM-Adapters' extraction, numbers are not comparable with published ones",
}


def prepare_benchmarks(
    benchmarks: str | list[str],
    *,
    data: dict[str, str] | None = None,
    data_dir: str | None = None,
    split: str = "test",
    limit: int | None = None,
) -> list[tuple[Benchmark, str, list[Example]]]:
    """Resolve, read and validate every benchmark's data (before any model is loaded).

    A benchmark named explicitly must have data; one that only came from a group ("math",
    "commonsense") and has none (HellaSwag is not in the shared copy) is skipped with a warning.
    """
    if limit is not None and limit < 1:
        raise ConfigError(f"limit={limit}: must be a positive number of examples (or None for all)")
    for key in data or {}:
        if key.lower() in GROUPS:
            raise ConfigError(f"--data {key}=...: name one benchmark, not a group")
    chosen, from_group = expand(benchmarks)
    prepared = []
    for bench in chosen:
        source = resolve_source(bench, data, data_dir)
        if source is None:
            if bench.name in from_group:
                logger.warning("%s: no data (not in the shared copy); skipped. Pass --data %s=PATH_OR_HUB_ID", bench.name, bench.name)
                continue
            raise DataError(
                f"{bench.name}: no data found; pass --data {bench.name}=PATH_OR_HUB_ID or --data-dir DIR "
                f"(with {bench.folder}/test.json inside)"
            )
        examples = load_examples(bench, source, split=split)
        prepared.append((bench, source, examples[:limit]))
    if not prepared:
        raise DataError(f"none of {', '.join(b.name for b in chosen)} has data; pass --data NAME=PATH or --data-dir DIR")
    return prepared


@functools.cache
def _metric():
    import evaluate

    return evaluate.load(METRIC_PATH)


def _protocol(bench: Benchmark, scoring: Scoring, num_beams: int, extraction: Mode) -> str:
    """The table's protocol label: "loglik", or "generate/greedy" / "generate/beam4", with
    "/strict" appended under the non-default extraction."""
    if scoring == "loglik" and bench.group == "commonsense":
        return "loglik"
    label = "generate/greedy" if num_beams == 1 else f"generate/beam{num_beams}"
    return label if extraction == DEFAULT_MODE else f"{label}/{extraction}"


def example_choices(bench: Benchmark, example: Example) -> tuple[str, ...]:
    """The answer words this example offers: its "Answer format: a/b/c" line when present (ARC
    questions have 3 to 5 options), else all of the benchmark's words."""
    match = re.search(r"Answer format:\s*([\w/]+)", example.instruction)
    words = tuple(w.lower() for w in match.group(1).split("/")) if match else ()
    return words if words and set(words) <= set(bench.rule.choices) else bench.rule.choices


def _read_predictions(path: Path) -> dict[int, dict]:
    """Predictions already written; a torn last line (killed mid-write) is cut off the file."""
    if not path.exists():
        return {}
    raw = path.read_bytes()
    done, good = {}, 0
    for line in raw.splitlines(keepends=True):
        try:
            if not line.endswith(b"\n"):
                raise ValueError("unterminated line")
            rec = json.loads(line)
        except ValueError:
            logger.warning("%s: dropping a torn line at byte %d (interrupted write)", path, good)
            break
        done[rec["index"]] = rec
        good += len(line)
    if good < len(raw):
        with open(path, "r+b") as f:
            f.truncate(good)
    return done


def _append(path: Path, records: list[dict]) -> None:
    with open(path, "a", encoding="utf-8") as f:
        f.write("".join(json.dumps(r) + "\n" for r in records))
        f.flush()
        os.fsync(f.fileno())


def _check_resume(result_path: Path, settings: dict) -> None:
    if not result_path.exists():
        return
    old = json.loads(result_path.read_text())["settings"]
    if old != settings:
        diff = {k: (old.get(k), settings.get(k)) for k in sorted(set(old) | set(settings)) if old.get(k) != settings.get(k)}
        raise ConfigError(
            f"{result_path.parent} holds predictions made with other settings ({diff}, as (saved, asked)); "
            "use a new --out or delete that folder to start over"
        )


def run_benchmark(
    model,
    tokenizer,
    bench: Benchmark,
    source: str,
    examples: list[Example],
    model_dir: Path,
    *,
    model_id: str,
    scoring: Scoring = "generate",
    batch_size: int = 8,
    max_new_tokens: int | None = None,
    num_beams: int = 1,
    extraction: Mode = DEFAULT_MODE,
) -> dict:
    """Predict (or resume predicting) `examples` and score them; returns the result dict that
    is also written to `<model_dir>/<bench>.json`."""
    from tqdm.auto import tqdm

    from .generate import generate, loglik_choose

    protocol = _protocol(bench, scoring, num_beams, extraction)
    generating = protocol != "loglik"
    settings = {
        "model": model_id,
        "data": source,
        "protocol": protocol,
        "prompt": "LLM-Adapters (Alpaca)",
        "max_new_tokens": (max_new_tokens or bench.max_new_tokens) if generating else None,
        "extraction": extraction if generating else None,  # loglik outputs are answer words: nothing to extract
    }
    jsonl, result_path = model_dir / f"{bench.name}.jsonl", model_dir / f"{bench.name}.json"
    _check_resume(result_path, settings)
    done = _read_predictions(jsonl)
    if not result_path.exists():
        atomic_write_text(result_path, json.dumps({"benchmark": bench.name, "settings": settings, "status": "running"}, indent=2))
    todo = [ex for ex in examples if ex.index not in done]
    bar = tqdm(total=len(examples), initial=len(examples) - len(todo), desc=f"{model_dir.name} {bench.name}", unit="ex")
    prompts = [ex.prompt for ex in todo]
    if not todo:
        batches = iter(())
    elif generating:
        batches = generate(model, tokenizer, prompts, batch_size=batch_size, max_new_tokens=settings["max_new_tokens"], num_beams=num_beams)
    else:
        batches = loglik_choose(model, tokenizer, prompts, [example_choices(bench, ex) for ex in todo], batch_size=batch_size)
    for positions, answers in batches:
        records = []
        for pos, answer in zip(positions, answers):
            ex = todo[pos]
            text, extra = (answer, {}) if generating else (answer[0], {"scores": answer[1]})
            prediction, correct = score(bench.rule, text, ex.answer, extraction)
            records.append({"index": ex.index, "instruction": ex.instruction, "gold": ex.answer, "output": text,
                            "prediction": prediction, "correct": correct, **extra})  # fmt: skip
            done[ex.index] = records[-1]
        _append(jsonl, records)
        bar.update(len(records))
    bar.close()

    recs = [done[ex.index] for ex in examples]
    metric = _metric().compute(predictions=[r["output"] for r in recs], references=[r["gold"] for r in recs], benchmark=bench.name,
                               extraction=extraction)  # fmt: skip
    result = {
        "benchmark": bench.name,
        "title": bench.title,
        "group": bench.group,
        "settings": settings,
        "status": "done",
        "accuracy": metric["accuracy"],
        "correct": metric["correct"],
        "total": metric["total"],
        "predictions": jsonl.name,
    }
    atomic_write_text(result_path, json.dumps(result, indent=2))
    logger.info("%s %s: %.2f%% (%d/%d, %s)", model_dir.name, bench.name, 100 * result["accuracy"], result["correct"], result["total"], protocol)
    return result


def check_options(*, batch_size: int, num_beams: int, max_new_tokens: int | None, scoring: str, extraction: str = DEFAULT_MODE) -> None:
    if batch_size < 1 or num_beams < 1 or (max_new_tokens is not None and max_new_tokens < 1):
        raise ConfigError(f"batch_size={batch_size}, num_beams={num_beams}, max_new_tokens={max_new_tokens}: each must be >= 1")
    if scoring not in PROTOCOL_NOTES:
        raise ConfigError(f"scoring={scoring!r}; choose one of {', '.join(PROTOCOL_NOTES)}")
    check_mode(extraction)


def evaluate_model(
    model,
    tokenizer,
    benchmarks: str | list[str] | list[tuple[Benchmark, str, list[Example]]],
    out_dir: str | os.PathLike,
    *,
    name: str = "model",
    model_id: str | None = None,
    data: dict[str, str] | None = None,
    data_dir: str | None = None,
    split: str = "test",
    limit: int | None = None,
    batch_size: int = 8,
    max_new_tokens: int | None = None,
    num_beams: int = 1,
    scoring: Scoring = "generate",
    extraction: Mode = DEFAULT_MODE,
) -> dict[str, dict]:
    """Evaluate an in-memory model on `benchmarks` ("gsm8k,boolq", "math", ... or the output of
    `prepare_benchmarks`); predictions and results go to `out_dir/<name>/`. Returns
    {benchmark: result dict with accuracy, correct, total, settings}. Resumes from `out_dir`.
    `extraction`: "llm_adapters" (LLM-Adapters' answer reading, exactly) or "strict"
    (see `moe_sft.evaluation.extract`).

    The tokenizer gets a pad token (eos) if it has none; batches are padded on the left.
    """
    from .generate import prepare_tokenizer

    check_options(batch_size=batch_size, num_beams=num_beams, max_new_tokens=max_new_tokens, scoring=scoring, extraction=extraction)
    if not re.fullmatch(r"[\w.+-]+", name):
        raise ConfigError(f"model name {name!r} must be a plain folder name (letters, digits, . _ + -)")
    if not (benchmarks and isinstance(benchmarks[0], tuple)):  # names, not prepared data
        benchmarks = prepare_benchmarks(benchmarks, data=data, data_dir=data_dir, split=split, limit=limit)
    prepare_tokenizer(tokenizer)
    model.eval()
    model_dir = Path(out_dir) / name
    model_dir.mkdir(parents=True, exist_ok=True)
    results = {}
    for bench, source, examples in benchmarks:
        results[bench.name] = run_benchmark(
            model, tokenizer, bench, source, examples, model_dir, model_id=model_id or name,
            scoring=scoring, batch_size=batch_size, max_new_tokens=max_new_tokens, num_beams=num_beams, extraction=extraction,
        )  # fmt: skip
    return results


def markdown_table(results: dict[str, dict[str, dict]]) -> str:
    """One row per benchmark, one column per model; cells are "accuracy % (correct/total)";
    per-group macro averages at the bottom."""
    models = list(results)
    names = [b for b in BENCHMARKS if any(b in r for r in results.values())]
    lines = [
        "| benchmark | protocol | " + " | ".join(models) + " |",
        "|---|---|" + "---|" * len(models),
    ]
    for b in names:
        protocols = sorted({r[b]["settings"]["protocol"] for r in results.values() if b in r})
        cells = [f"{100 * r[b]['accuracy']:.2f} ({r[b]['correct']}/{r[b]['total']})" if b in r else "-" for r in results.values()]
        lines.append(f"| {BENCHMARKS[b].title} | {', '.join(protocols)} | " + " | ".join(cells) + " |")
    for group in GROUPS:
        accs = [[r[b]["accuracy"] for b in names if b in r and BENCHMARKS[b].group == group] for r in results.values()]
        if any(accs):
            cells = [f"{100 * sum(a) / len(a):.2f}" if a else "-" for a in accs]
            lines.append(f"| **{group} average** | | " + " | ".join(cells) + " |")
    parts = {part for r in results.values() for b in r for part in r[b]["settings"]["protocol"].split("/")}
    notes = [f"- `{p}`: {text}" for p, text in (PROTOCOL_NOTES | EXTRACTION_NOTES).items() if p in parts]
    return "\n".join(["# moe-sft eval", "", "Accuracy in % (correct/total).", "", *notes, "", *lines, ""])


def write_report(out_dir: str | os.PathLike, results: dict[str, dict[str, dict]]) -> str:
    """Write results.md and results.json (atomically) for {model name: {benchmark: result}}."""
    table = markdown_table(results)
    atomic_write_text(Path(out_dir) / "results.md", table)
    atomic_write_text(Path(out_dir) / "results.json", json.dumps({"models": results}, indent=2))
    return table


def model_name(path: str, taken: set[str]) -> str:
    """A folder name for `path` (local folder name, or hub id with "/" -> "--"), unique in `taken`."""
    p = Path(path)
    base = p.resolve().name if p.exists() else path.replace("/", "--")
    base = re.sub(r"[^\w.+-]", "_", base) or "model"
    name, n = base, 2
    while name in taken:
        name, n = f"{base}-{n}", n + 1
    taken.add(name)
    return name


def run_eval(
    models: list[str],
    benchmarks: str | list[str],
    out_dir: str | os.PathLike,
    *,
    dtype: str = "auto",
    adapter: str | None = None,
    data: dict[str, str] | None = None,
    data_dir: str | None = None,
    split: str = "test",
    limit: int | None = None,
    batch_size: int = 8,
    max_new_tokens: int | None = None,
    num_beams: int = 1,
    scoring: Scoring = "generate",
    extraction: Mode = DEFAULT_MODE,
) -> str:
    """`moe-sft eval`: validate all data, then load and evaluate each model in turn (stock or
    patched checkpoints, folders or hub ids), then write the side-by-side table. Returns it."""
    import torch
    from transformers import AutoTokenizer

    from ..pretrained import from_pretrained

    torch_dtype = dtype if dtype == "auto" else getattr(torch, dtype, None)
    if not isinstance(torch_dtype, (str, torch.dtype)):
        raise ConfigError(f"--dtype {dtype!r} is not a torch dtype (try auto, float32 or bfloat16)")
    check_options(batch_size=batch_size, num_beams=num_beams, max_new_tokens=max_new_tokens, scoring=scoring, extraction=extraction)
    if adapter is not None and not Path(adapter).is_dir():
        raise FileNotFoundError(f"--adapter {adapter}: no such folder (write one with moe_sft.save_moe_bias_adapter)")
    prepared = prepare_benchmarks(benchmarks, data=data, data_dir=data_dir, split=split, limit=limit)
    placement = {"device_map": "auto"} if torch.cuda.is_available() else {}
    results, taken = {}, set()
    for path in models:
        name = model_name(path, taken)
        model_id = str(Path(path).resolve()) if Path(path).exists() else path
        model = from_pretrained(path, dtype=torch_dtype, **placement)
        if adapter is not None:
            from ..methods.moe_bias_head import load_moe_bias_adapter

            load_moe_bias_adapter(model, adapter)
        tokenizer = AutoTokenizer.from_pretrained(path)
        results[name] = evaluate_model(
            model, tokenizer, prepared, out_dir, name=name, model_id=model_id if adapter is None else f"{model_id} + {Path(adapter).resolve()}",
            batch_size=batch_size, max_new_tokens=max_new_tokens, num_beams=num_beams, scoring=scoring, extraction=extraction,
        )  # fmt: skip
        del model
        gc.collect()
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
    return write_report(out_dir, results)
