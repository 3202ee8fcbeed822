"""`moe-sft ablate CONFIG.yaml`: a grid of pruning strategies x ratios x seeds on one model.

Each cell masks its experts in the one loaded model (mask mode, in memory), evaluates it with
`moe_sft.evaluation.evaluate_model`, and unmasks. The grid is the unpruned model, then for
each strategy: least_used / most_used at every ratio, super_experts once (its rule fixes the
count), random for every strategy in `random_controls` at every ratio (once for
super_experts) and every seed.

Output folder (`out`):
    settings.json          what the numbers depend on; a rerun with other settings is refused
    profile/               the expert profile, when made here from `profile_data`
    cells/<cell>.json      one per finished cell: pruned experts and accuracies
    eval/<cell>/           the evaluation's per-example files (a cut-off cell resumes there)
    ablation.csv           one row per cell and benchmark
    ablation.md            one row per strategy and ratio; random as mean ± std over seeds
    ablation.png           mean accuracy against the fraction of experts pruned, per strategy
Rerunning skips the cells already in `cells/`; adding ratios or seeds only runs the new cells.
"""

from __future__ import annotations

import csv
import dataclasses
import hashlib
import io
import json
import logging
import statistics
from pathlib import Path
from typing import Literal

from ..config import ConfigError, apply_overrides, from_dict, load_yaml
from ..io import atomic_file, atomic_write_text
from ..train.config import ModelConfig
from .mask import check_selection, disabled_experts, masked, merge
from .profile import PROFILE_JSON, ExpertProfile, profile_model, read_texts, write_profile
from .strategies import Selection, fraction_pruned, select_experts

logger = logging.getLogger(__name__)

Strategy = Literal["least_used", "most_used", "super_experts", "random"]
Controlled = Literal["least_used", "most_used", "super_experts"]


@dataclasses.dataclass
class AblateConfig:
    """One ablation grid.

    model            the model (`path` to a stock or patched checkpoint, or `tiny: <model_type>`)
    out              output folder (reused to resume)
    benchmarks       benchmark names or groups, as `moe-sft eval --benchmarks`
    profile          a folder written by `moe-sft profile` for this model, or else
    profile_data     a data file to profile on first (LLM-Adapters / chat / {"text"} records)
    profile_limit    records of `profile_data` to use (null: all)
    strategies       which strategies to run
    ratios           fractions of each layer's experts to prune (least_used, most_used, random)
    seeds            seeds of the random control
    random_controls  strategies whose per-layer counts the random control copies
    limit, batch_size, max_new_tokens, num_beams, scoring, data_dir: as `moe-sft eval`
    """

    model: ModelConfig
    out: str
    benchmarks: list[str]
    profile: str | None = None
    profile_data: str | None = None
    profile_limit: int | None = 256
    profile_batch_size: int = 8
    profile_max_length: int = 1024
    strategies: list[Strategy] = dataclasses.field(default_factory=lambda: ["least_used", "most_used", "random"])
    ratios: list[float] = dataclasses.field(default_factory=lambda: [0.125, 0.25])
    seeds: list[int] = dataclasses.field(default_factory=lambda: [0, 1, 2])
    random_controls: list[Controlled] = dataclasses.field(default_factory=lambda: ["least_used"])
    limit: int | None = None
    batch_size: int = 8
    max_new_tokens: int | None = None
    num_beams: int = 1
    scoring: Literal["generate", "loglik"] = "generate"
    data_dir: str | None = None

    def __post_init__(self):
        if (self.profile is None) == (self.profile_data is None):
            raise ConfigError(
                f"give exactly one of `profile` (a `moe-sft profile` folder) and `profile_data` (a data file to "
                f"profile on), got profile={self.profile!r}, profile_data={self.profile_data!r}"
            )
        if not self.strategies:
            raise ConfigError("strategies is empty; list some of least_used, most_used, super_experts, random")
        bad = [r for r in self.ratios if not 0 < r < 1]
        if bad:
            raise ConfigError(f"ratios {bad}: each must be in (0, 1), a fraction of each layer's experts")
        needs_ratio = {"least_used", "most_used"} & set(self.strategies) or (
            "random" in self.strategies and set(self.random_controls) - {"super_experts"}
        )
        if needs_ratio and not self.ratios:
            raise ConfigError(f"strategies {self.strategies} need ratios; list some, e.g. ratios: [0.125, 0.25]")
        if "random" in self.strategies and not (self.seeds and self.random_controls):
            raise ConfigError(f"random needs seeds and random_controls, got seeds={self.seeds}, random_controls={self.random_controls}")
        if len(set(self.seeds)) != len(self.seeds) or len(set(self.ratios)) != len(self.ratios):
            raise ConfigError(f"ratios {self.ratios} and seeds {self.seeds} must not repeat values")


def load_config(path: str | Path, overrides: list[str] | None = None) -> AblateConfig:
    return from_dict(AblateConfig, apply_overrides(load_yaml(path), overrides or []))


@dataclasses.dataclass
class Cell:
    """One pruned model of the grid."""

    strategy: str  # "unpruned" for the baseline
    ratio: float | None = None
    seed: int | None = None
    controls: str | None = None  # random only

    @property
    def name(self) -> str:
        parts = [self.strategy] + ([self.controls] if self.controls else [])
        parts += [f"r{self.ratio:g}"] if self.ratio is not None else []
        parts += [f"s{self.seed}"] if self.seed is not None else []
        return "-".join(parts)

    @property
    def label(self) -> str:
        """Row / line label: random cells of all seeds share one."""
        return f"random (as {self.controls})" if self.controls else self.strategy


def grid(cfg: AblateConfig) -> list[Cell]:
    cells = [Cell("unpruned")]
    for strategy in cfg.strategies:
        if strategy == "super_experts":
            cells.append(Cell(strategy))
        elif strategy == "random":
            for controls in cfg.random_controls:
                ratios = [None] if controls == "super_experts" else sorted(cfg.ratios)
                cells += [Cell("random", r, s, controls) for r in ratios for s in cfg.seeds]
        else:
            cells += [Cell(strategy, r) for r in sorted(cfg.ratios)]
    return cells


def cell_selection(profile: ExpertProfile, cell: Cell, exclude: Selection) -> Selection:
    """The experts `cell` masks on top of `exclude` (those the model already masks)."""
    if cell.strategy == "unpruned":
        return {}
    return select_experts(
        profile, cell.strategy, ratio=cell.ratio, seed=cell.seed or 0, controls=cell.controls or "least_used", exclude=exclude
    )


# ---- running ------------------------------------------------------------------------------
def _load_model(m: ModelConfig):
    import torch
    from transformers import AutoTokenizer

    if m.tiny is not None:
        from ..testing import tiny_model, tiny_tokenizer

        dtype = torch.float32 if m.dtype == "auto" else getattr(torch, m.dtype)
        model = tiny_model(m.tiny, seed=m.seed, experts_implementation=m.experts_implementation, dtype=dtype)
        if torch.cuda.is_available():
            model.cuda()
        return model, tiny_tokenizer() if m.tokenizer is None else AutoTokenizer.from_pretrained(m.tokenizer)
    from ..pretrained import from_pretrained

    kwargs = {"dtype": m.dtype if m.dtype == "auto" else getattr(torch, m.dtype)}
    kwargs.update({k: v for k in ("attn_implementation", "experts_implementation") if (v := getattr(m, k)) is not None})
    if torch.cuda.is_available():
        kwargs["device_map"] = "auto"
    return from_pretrained(m.path, **kwargs), AutoTokenizer.from_pretrained(m.tokenizer or m.path)


def _model_id(m: ModelConfig) -> str:
    if m.tiny is not None:
        return f"tiny:{m.tiny} seed {m.seed}"
    return str(Path(m.path).resolve()) if Path(m.path).exists() else m.path


def _settings(cfg: AblateConfig, prepared, profile_text: str) -> dict:
    return {
        "model": _model_id(cfg.model),
        "dtype": cfg.model.dtype,
        "profile": cfg.profile or f"{cfg.profile_data} (limit {cfg.profile_limit}, max_length {cfg.profile_max_length})",
        "profile_sha256": hashlib.sha256(profile_text.encode()).hexdigest(),
        "benchmarks": {bench.name: source for bench, source, _ in prepared},
        "limit": cfg.limit,
        "scoring": cfg.scoring,
        "num_beams": cfg.num_beams,
        "max_new_tokens": cfg.max_new_tokens,
    }


def _check_settings(out: Path, settings: dict) -> None:
    """Refuse a folder holding an ablation with other settings (nothing is written here)."""
    path = out / "settings.json"
    if path.exists():
        old = json.loads(path.read_text())
        if old != settings:
            diff = {k: (old.get(k), settings.get(k)) for k in sorted(set(old) | set(settings)) if old.get(k) != settings.get(k)}
            raise ConfigError(
                f"{out} holds an ablation with other settings ({diff}, as (saved, asked)); use a new `out` or delete "
                "that folder to start over"
            )


def _profile(cfg: AblateConfig, out: Path, model, tokenizer) -> tuple[ExpertProfile, bool]:
    """The configured profile, or the one made (once) from `profile_data` for out/profile;
    True when it was made now and still has to be written."""
    if cfg.profile is not None:
        profile, fresh = ExpertProfile.load(cfg.profile), False
    elif (out / "profile" / PROFILE_JSON).is_file():
        profile, fresh = ExpertProfile.load(out / "profile"), False
    else:
        texts = read_texts(cfg.profile_data, tokenizer, limit=cfg.profile_limit)
        profile = profile_model(model, tokenizer, texts, batch_size=cfg.profile_batch_size, max_length=cfg.profile_max_length,
                                model_id=_model_id(cfg.model), data=cfg.profile_data)  # fmt: skip
        fresh = True
    profile.check_matches(model)
    return profile, fresh


def plan(cfg: AblateConfig, profile: ExpertProfile, model=None) -> list[tuple[Cell, Selection]]:
    """Every cell of the grid with its selection, each checked as masking it in `model` will
    check it (without a model: the counts and top_k survivors on the profile alone). The first
    cell that cannot run is an error naming it."""
    exclude = disabled_experts(model) if model is not None else {}
    cells = []
    for cell in grid(cfg):
        try:
            selection = cell_selection(profile, cell, exclude)
            if model is not None:
                check_selection(model, merge(exclude, selection))
        except ConfigError as e:
            raise ConfigError(f"ablation cell {cell.name}: {e}; nothing was written") from None
        cells.append((cell, selection))
    return cells


def run_ablation(cfg: AblateConfig) -> str:
    """Run (or resume) the grid; write CSV, Markdown and plot; return the Markdown table.
    Data, profile, settings and every cell's selection are checked before anything is written."""
    from tqdm.auto import tqdm

    from ..evaluation import prepare_benchmarks
    from ..patching import get_handle, patch_model

    prepared = prepare_benchmarks(cfg.benchmarks, data_dir=cfg.data_dir, limit=cfg.limit)
    if cfg.profile is not None:
        plan(cfg, ExpertProfile.load(cfg.profile))  # counts, before the model is loaded
    out = Path(cfg.out)
    model, tokenizer = _load_model(cfg.model)
    if get_handle(model) is None:
        patch_model(model)  # every method off (stock outputs); cells set and clear masks on it
    profile, fresh = _profile(cfg, out, model, tokenizer)
    settings = _settings(cfg, prepared, json.dumps(profile.to_json()))
    _check_settings(out, settings)
    cells = plan(cfg, profile, model)
    for cell, selection in cells:
        if cell.strategy != "unpruned" and not selection:
            logger.warning("ablation: %s selects no expert on this profile; its cell equals the unpruned model", cell.name)

    if fresh:
        write_profile(profile, out / "profile")
    if not (out / "settings.json").exists():
        atomic_write_text(out / "settings.json", json.dumps(settings, indent=2) + "\n")
    (out / "cells").mkdir(exist_ok=True)
    records = [_run_cell(cfg, out, model, tokenizer, prepared, profile, cell, selection)
               for cell, selection in tqdm(cells, desc="ablation", unit="cell")]  # fmt: skip
    skipped = sum(done for _, done in records)
    if skipped:
        logger.info("ablation: %d of %d cells were already done in %s and were skipped", skipped, len(cells), out)
    return write_outputs(out, [record for record, _ in records], [bench.name for bench, _, _ in prepared])


def _run_cell(cfg: AblateConfig, out: Path, model, tokenizer, prepared, profile, cell: Cell, selection: Selection):
    """(record, True) for a cell finished earlier, else evaluate it masked and (record, False)."""
    from ..evaluation import evaluate_model

    path = out / "cells" / f"{cell.name}.json"
    if path.exists():
        return json.loads(path.read_text()), True
    with masked(model, selection):
        results = evaluate_model(model, tokenizer, prepared, out / "eval", name=cell.name, model_id=f"{_model_id(cfg.model)} [{cell.name}]",
                                 batch_size=cfg.batch_size, max_new_tokens=cfg.max_new_tokens, num_beams=cfg.num_beams,
                                 scoring=cfg.scoring)  # fmt: skip
    record = {
        **dataclasses.asdict(cell),
        "cell": cell.name,
        "label": cell.label,
        "num_pruned": sum(len(v) for v in selection.values()),
        "fraction_pruned": fraction_pruned(profile, selection),
        "pruned": {str(k): v for k, v in selection.items()},
        "results": {b: {k: r[k] for k in ("accuracy", "correct", "total")} for b, r in results.items()},
    }
    atomic_write_text(path, json.dumps(record, indent=2) + "\n")
    return record, False


# ---- outputs ------------------------------------------------------------------------------
CSV_FIELDS = ("cell", "strategy", "controls", "ratio", "seed", "num_pruned", "fraction_pruned", "benchmark", "accuracy", "correct", "total")


def _mean_acc(record: dict) -> float:
    return statistics.fmean(r["accuracy"] for r in record["results"].values())


def _groups(records: list[dict]) -> list[tuple[str, float | None, list[dict]]]:
    """(label, ratio, records) in grid order; the seeds of a random cell share a group."""
    groups: dict[tuple, list[dict]] = {}
    for rec in records:
        groups.setdefault((rec["label"], rec["ratio"]), []).append(rec)
    return [(label, ratio, recs) for (label, ratio), recs in groups.items()]


def _fmt(values: list[float]) -> str:
    """Accuracy in %; several seeds as mean ± sample std."""
    pct = [100 * v for v in values]
    if len(pct) == 1:
        return f"{pct[0]:.2f}"
    return f"{statistics.fmean(pct):.2f} ± {statistics.stdev(pct):.2f}"


def markdown_table(records: list[dict], benchmarks: list[str]) -> str:
    lines = [
        "# moe-sft ablate",
        "",
        "Accuracy in %; random rows: mean ± std over seeds (n = number of seeds). Experts are masked (router logit "
        "-inf, top-k renormalised among the survivors).",
        "",
        "| strategy | ratio | pruned (all layers) | fraction | n | " + " | ".join(benchmarks) + " | mean |",
        "|---|---|---|---|---|" + "---|" * (len(benchmarks) + 1),
    ]
    for label, ratio, recs in _groups(records):
        cells = [_fmt([r["results"][b]["accuracy"] for r in recs]) for b in benchmarks]
        pruned = sorted({r["num_pruned"] for r in recs})
        lines.append(
            f"| {label} | {'-' if ratio is None else f'{ratio:g}'} | {'/'.join(map(str, pruned))} | "
            f"{recs[0]['fraction_pruned']:.3f} | {len(recs)} | " + " | ".join(cells) + f" | {_fmt([_mean_acc(r) for r in recs])} |"
        )
    return "\n".join(lines) + "\n"


def write_csv(records: list[dict]) -> str:
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=CSV_FIELDS, lineterminator="\n")
    writer.writeheader()
    for rec in records:
        for bench, r in rec["results"].items():
            writer.writerow({**{k: rec[k] for k in CSV_FIELDS[:7]}, "benchmark": bench, **r})
    return buf.getvalue()


def plot(records: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.5, 4.5))
    lines: dict[str, list[tuple[float, float, float]]] = {}
    for label, _ratio, recs in _groups(records):
        accs = [100 * _mean_acc(r) for r in recs]
        std = statistics.stdev(accs) if len(accs) > 1 else 0.0
        frac = statistics.fmean(r["fraction_pruned"] for r in recs)
        lines.setdefault(label, []).append((frac, statistics.fmean(accs), std))
    for label, points in lines.items():
        points.sort()
        xs, ys, errs = zip(*points)
        if label == "unpruned":
            ax.axhline(ys[0], color="gray", ls="--", lw=1, label="unpruned")
            continue
        ax.errorbar(xs, ys, yerr=errs if any(errs) else None, marker="o", capsize=3, label=label)
    ax.set_xlabel("fraction of routed experts pruned")
    ax.set_ylabel("accuracy (%), mean over benchmarks")
    ax.set_title("expert pruning ablation")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, format="png", dpi=120)
    plt.close(fig)


def write_outputs(out: Path, records: list[dict], benchmarks: list[str]) -> str:
    table = markdown_table(records, benchmarks)
    atomic_write_text(out / "ablation.csv", write_csv(records))
    atomic_write_text(out / "ablation.md", table)
    with atomic_file(out / "ablation.png") as tmp:
        plot(records, tmp)
    return table
