"""`moe-sft demo`: the whole project on a laptop CPU in a few minutes, nothing downloaded.

1. a small Qwen3-MoE (hidden 128, 2 layers, 16 experts, top-2) and a character-level tokenizer;
2. pre-training on the synthetic nine-skill corpus (`corpus.py`, Zipf frequencies) for a fixed
   wall-time budget (AdamW, lr 3e-3, cosine over the budget), saved as a checkpoint;
3. expert profiling (heatmap) and a pruning comparison at 25%: least-used vs random (several
   seeds) vs most-used experts, mask mode;
4. fine-tuning on one rare skill alone (default `mul`) with every method, each through
   `moe_sft.train.run_recipe` on a YAML written to `<out>/configs/` (exactly `moe-sft train`);
   every method gets the same number of optimizer steps, data order, lr and seed;
5. a table per method: target-skill accuracy, accuracy kept on the rare and the other skills,
   expert-usage entropy and step time (Markdown + JSON) and plots.

Accuracy is exact match of greedy decoding, computed in one teacher-forced forward: greedy
decoding produces `answer</s>` exactly when, at every answer position, the argmax next token
given the gold prefix is the gold token (the first wrong argmax is where decoding would leave
the answer). `tests/test_demo.py` checks this against `model.generate`.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import os
import platform
import shutil
import time
from pathlib import Path

import torch
import yaml

from ..config import ConfigError
from ..io import atomic_write_text
from . import corpus

logger = logging.getLogger(__name__)

MARKER = "demo.json"  # marks a folder as a demo output (so a rerun may replace it)
METHODS: dict[str, dict] = {  # method -> its moe_sft blocks in the train YAML
    "vanilla": {},
    "frozen_router": {"frozen_router": {}},
    "densemixer": {"densemixer": {}},
    "esft": {"esft": {"score": "token"}},
    "condenser": {"condenser": {}},  # phase 1 (bias only); phase 2 adds condensers, see _condenser_yamls
    "moe_bias_head": {"moe_bias_head": {"num_experts": 16, "top_k": 2}},
}


@dataclasses.dataclass(frozen=True)
class DemoSettings:
    pretrain_seconds: float = 120.0  # wall-time budget of pre-training
    finetune_seconds: float = 18.0  # fine-tuning steps = this / pre-training's median step time
    batch_size: int = 64
    pretrain_lr: float = 3e-3
    finetune_lr: float = 1e-3
    pretrain_records: int = 24000  # distinct training examples (repeated for longer runs)
    finetune_records: int = 3000
    eval_per_skill: int = 100
    profile_texts: int = 1000
    prune_ratio: float = 0.25
    prune_seeds: tuple[int, ...] = (0, 1, 2, 3, 4)
    target: str = "mul"
    seed: int = 0

    def __post_init__(self):
        if self.target not in corpus.SKILL_NAMES:
            raise ConfigError(f"demo target skill {self.target!r} is not one of {', '.join(corpus.SKILL_NAMES)}")


QUICK = DemoSettings(
    pretrain_seconds=6.0, finetune_seconds=1.0, pretrain_records=2000, finetune_records=300,
    eval_per_skill=12, profile_texts=128, prune_seeds=(0, 1),
)  # fmt: skip

MODEL = dict(  # Qwen3-MoE-shaped, ~1.7M parameters
    hidden_size=128, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, head_dim=32,
    intermediate_size=256, num_experts=16, num_experts_per_tok=2, moe_intermediate_size=128,
    norm_topk_prob=True, max_position_embeddings=64, tie_word_embeddings=False,
)  # fmt: skip


# ---- model and data -----------------------------------------------------------------------
def build_model(tokenizer, seed: int):
    """A randomly initialised Qwen3-MoE causal LM sized for the demo (stock transformers,
    default `grouped_mm` experts)."""
    from transformers import AutoConfig, AutoModelForCausalLM

    config = AutoConfig.for_model(
        "qwen3_moe", vocab_size=len(tokenizer), pad_token_id=tokenizer.pad_token_id,
        bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id, **MODEL,
    )  # fmt: skip
    torch.manual_seed(seed)
    return AutoModelForCausalLM.from_config(config)


def _write_jsonl(path: Path, pairs) -> str:
    atomic_write_text(path, "".join(json.dumps(corpus.to_record(q, a)) + "\n" for q, a in pairs))
    return str(path)


def _write_yaml(path: Path, data: dict) -> Path:
    atomic_write_text(path, f"# moe-sft train {path}\n" + yaml.safe_dump(data, sort_keys=False))
    return path


def _recipe(model_path: str, data_file: str, out_dir: Path, s: DemoSettings, *, lr: float, steps: int,
            scheduler: str, blocks: dict) -> dict:  # fmt: skip
    return {
        "model": {"path": model_path},
        "data": {"files": [data_file], "format": "messages", "max_length": 32},
        **blocks,
        "training": {
            "output_dir": str(out_dir), "max_steps": steps, "per_device_train_batch_size": s.batch_size,
            "learning_rate": lr, "lr_scheduler_type": scheduler, "weight_decay": 0.0, "logging_steps": max(steps // 5, 1),
            "save_strategy": "no", "report_to": "none", "seed": s.seed, "dataloader_drop_last": True,
            "dataloader_pin_memory": False,
        },  # fmt: skip
    }


# ---- evaluation ---------------------------------------------------------------------------
@torch.no_grad()
def exact_match(model, tokenizer, pairs: list[tuple[str, str]], batch_size: int = 256) -> list[bool]:
    """Per (question, answer): does greedy decoding after `<s>question=` give `answer</s>`?
    One teacher-forced forward per batch (see the module docstring)."""
    eos = tokenizer.eos_token_id
    rows = []
    for q, a in pairs:
        prompt = tokenizer(f"<s>{q}=", add_special_tokens=False)["input_ids"]
        rows.append((prompt, tokenizer(a, add_special_tokens=False)["input_ids"] + [eos]))
    was_training = model.training
    model.eval()
    out = []
    for start in range(0, len(rows), batch_size):
        chunk = rows[start : start + batch_size]
        n = max(len(p) + len(r) for p, r in chunk)
        ids = torch.full((len(chunk), n), tokenizer.pad_token_id, dtype=torch.long)
        mask = torch.zeros_like(ids)
        for i, (p, r) in enumerate(chunk):
            ids[i, : len(p) + len(r)] = torch.tensor(p + r)
            mask[i, : len(p) + len(r)] = 1
        pred = model(input_ids=ids, attention_mask=mask, use_cache=False).logits.argmax(-1)  # (B, n)
        for i, (p, r) in enumerate(chunk):
            # position j predicts token j+1: the answer's tokens are predicted at len(p)-1 ...
            out.append(pred[i, len(p) - 1 : len(p) - 1 + len(r)].tolist() == r)
    model.train(was_training)
    return out


def skill_accuracy(model, tokenizer, evalset: dict[str, list]) -> dict[str, float]:
    flat = [pair for name in corpus.SKILL_NAMES for pair in evalset[name]]
    ok = exact_match(model, tokenizer, flat)
    acc, i = {}, 0
    for name in corpus.SKILL_NAMES:
        n = len(evalset[name])
        acc[name] = sum(ok[i : i + n]) / n
        i += n
    return acc


def weighted(acc: dict[str, float], skills) -> float:
    """Accuracy over `skills` weighted by their corpus frequency."""
    w = corpus.skill_weights()
    return sum(w[k] * acc[k] for k in skills) / sum(w[k] for k in skills)


def usage_entropy(model, tokenizer, texts: list[str]) -> float:
    """Mean over MoE layers of the entropy of the experts' selection shares / ln E (1 = uniform)."""
    from ..pruning import profile_model

    prof = profile_model(model, tokenizer, texts, batch_size=256)
    shares = prof.counts.double() / prof.counts.sum(1, keepdim=True).clamp_min(1)
    ent = -(shares * shares.clamp_min(1e-30).log()).sum(1) / math.log(prof.num_experts)
    return float(ent.mean())


# ---- the steps ----------------------------------------------------------------------------
def _prepare_out(out: Path) -> None:
    """A fresh output folder; a previous demo's is replaced, anything else is refused."""
    if out.exists() and any(out.iterdir()):
        if not (out / MARKER).is_file():
            raise FileExistsError(f"{out} exists and is not a moe-sft demo output folder; choose another --out")
        shutil.rmtree(out)
    out.mkdir(parents=True, exist_ok=True)
    atomic_write_text(out / MARKER, json.dumps({"status": "running"}) + "\n")


def pretrain(out: Path, s: DemoSettings, tokenizer, evalset) -> tuple[Path, float, dict]:
    """Random init -> checkpoint -> `train()` under a wall-time budget -> stock checkpoint
    `<out>/pretrained`. Returns that folder, the median step time (s) and a summary."""
    from ..pretrained import from_pretrained
    from ..patching import get_handle
    from ..train import load_train_config, train
    from ..train.callbacks import StepTimer, TimeBudget

    held_out = frozenset(q for pairs in evalset.values() for q, _ in pairs)
    data = _write_jsonl(out / "data" / "pretrain.jsonl", corpus.sample(s.pretrain_records, s.seed, exclude=held_out))
    init = out / "init"
    model = build_model(tokenizer, s.seed)
    model.save_pretrained(init)
    tokenizer.save_pretrained(init)
    n_params = sum(p.numel() for p in model.parameters())
    # max_steps only bounds the run (at 50 steps/s); the time budget ends it, and the lr is a
    # cosine over the budget's elapsed fraction (TimeBudget(anneal="cosine")).
    steps = int(s.pretrain_seconds * 50)
    cfg = _recipe(str(init), data, out / "pretrain", s, lr=s.pretrain_lr, steps=steps, scheduler="constant", blocks={})
    path = _write_yaml(out / "configs" / "pretrain.yaml", cfg)
    budget, timer = TimeBudget(s.pretrain_seconds, anneal="cosine"), StepTimer()
    logger.info("demo: pre-training %.1fM parameters for %.0f s", n_params / 1e6, s.pretrain_seconds)
    final = train(load_train_config(path), callbacks=(budget, timer))
    # train() saves a patched checkpoint (every method off); keep a stock one as the base that
    # every method's run patches in its own way.
    model = from_pretrained(final)
    get_handle(model).revert()
    pretrained = out / "pretrained"
    model.save_pretrained(pretrained)
    tokenizer.save_pretrained(pretrained)
    return pretrained, timer.median(), {"parameters": n_params, "steps": budget.steps, "seconds": s.pretrain_seconds,
                                    "median_step_ms": 1000 * timer.median(), "records": s.pretrain_records}  # fmt: skip


def prune_compare(model, tokenizer, s: DemoSettings, evalset, out: Path) -> dict:
    """Profile the pre-trained model on corpus text, then mask 25% of each layer's experts:
    least used, most used, and random (one draw per seed)."""
    from ..pruning import masked, profile_model, select_experts, write_profile

    texts = [f"<s>{q}={a}</s>" for q, a in corpus.sample(s.profile_texts, s.seed + 1)]
    prof = profile_model(model, tokenizer, texts, batch_size=128, model_id="pretrained", data="demo corpus")
    write_profile(prof, out / "profile", overwrite=True)
    rows = {"unpruned": [weighted(skill_accuracy(model, tokenizer, evalset), corpus.SKILL_NAMES)]}
    cells = [("least_used", 0), ("most_used", 0)] + [("random", seed) for seed in s.prune_seeds]
    for strategy, seed in cells:
        sel = select_experts(prof, strategy, ratio=s.prune_ratio, seed=seed, controls="least_used")
        with masked(model, sel):
            acc = weighted(skill_accuracy(model, tokenizer, evalset), corpus.SKILL_NAMES)
        rows.setdefault(strategy, []).append(acc)
    return {"ratio": s.prune_ratio, "per_layer": round(s.prune_ratio * prof.num_experts), "seeds": list(s.prune_seeds),
            "accuracy": rows}  # fmt: skip


def _method_yamls(method: str, base: str, data: str, out: Path, s: DemoSettings, steps: int) -> Path:
    """The YAML(s) of one method; the condenser's phase 1 names phase 2 in `then:` (half the
    steps each, so every method trains the same number of steps)."""
    cfgs = out / "configs"
    run = out / "finetune"
    if method != "condenser":
        cfg = _recipe(base, data, run / method, s, lr=s.finetune_lr, steps=steps, scheduler="cosine", blocks=METHODS[method])
        return _write_yaml(cfgs / f"{method}.yaml", cfg)
    half = max(steps // 2, 1)
    p1 = _recipe(base, data, run / "condenser_phase1", s, lr=s.finetune_lr, steps=half, scheduler="cosine",
                 blocks=METHODS["condenser"])  # fmt: skip
    # Phase 2: one long-tail condenser per layer (top-2 routing, compute_neutral: 1 routed + 1
    # condenser), gamma 5e-5 as the paper's phase 2; starts from phase 1's final model.
    p2 = _recipe(str(run / "condenser_phase1" / "final"), data, run / "condenser", s, lr=s.finetune_lr,
                 steps=steps - half, scheduler="cosine",
                 blocks={"condenser": {"bias": {"gamma": 5.0e-5}, "condensers": {"num": 1}}})  # fmt: skip
    p1["then"] = str(_write_yaml(cfgs / "condenser_phase2.yaml", p2))
    return _write_yaml(cfgs / "condenser_phase1.yaml", p1)


def finetune_all(base: Path, out: Path, s: DemoSettings, steps: int, tokenizer, evalset, entropy_texts) -> dict:
    from ..pretrained import from_pretrained
    from ..train import run_recipe
    from ..train.callbacks import StepTimer

    held_out = frozenset(q for q, _ in evalset[s.target])
    pairs = corpus.sample(s.finetune_records, s.seed + 2, skills={s.target: 1.0}, exclude=held_out)
    data = _write_jsonl(out / "data" / f"finetune_{s.target}.jsonl", pairs)
    results = {}
    for method in METHODS:
        path = _method_yamls(method, str(base), data, out, s, steps)
        timer = StepTimer()
        logger.info("demo: fine-tuning %s on %s for %d steps (%s)", method, s.target, steps, path)
        final = run_recipe(path, callbacks=(timer,))[-1]
        model = from_pretrained(final)
        results[method] = {
            "accuracy": skill_accuracy(model, tokenizer, evalset),
            "usage_entropy": usage_entropy(model, tokenizer, entropy_texts),
            "median_step_ms": 1000 * timer.median(),
            "steps": len(timer.times),
        }
    return results


# ---- report -------------------------------------------------------------------------------
def rare_skills(target: str) -> list[str]:
    """The skills rarer than uniform in the corpus, the fine-tuning target excluded."""
    w = corpus.skill_weights()
    return [k for k in corpus.SKILL_NAMES if k != target and w[k] < 1 / len(w)]


def rows(results: dict, base_acc: dict[str, float], target: str) -> list[dict]:
    """One row per method (plus the pre-trained model): target accuracy, accuracy on the rare
    skills (less frequent than uniform, target excluded) and on every other skill (weighted by
    corpus frequency), usage entropy, step time."""
    others = [k for k in corpus.SKILL_NAMES if k != target]
    rare = rare_skills(target)
    out = []
    for name, r in {"pre-trained (no fine-tuning)": {"accuracy": base_acc}, **results}.items():
        acc = r["accuracy"]
        out.append({
            "method": name,
            "target_acc": acc[target],
            "rare_acc": sum(acc[k] for k in rare) / len(rare),
            "other_acc": weighted(acc, others),
            "usage_entropy": r.get("usage_entropy"),
            "median_step_ms": r.get("median_step_ms"),
            "steps": r.get("steps"),
        })  # fmt: skip
    return out


def markdown(table: list[dict], target: str, rare: list[str], pruning: dict) -> str:
    def f(v, fmt):
        return "—" if v is None else format(v, fmt)

    lines = [
        f"| method | {target} accuracy (target) | rare skills ({', '.join(rare)}) | other skills (weighted) | usage entropy | step (ms) | steps |",
        "|---|---|---|---|---|---|---|",
    ]
    for r in table:
        lines.append(
            f"| {r['method']} | {r['target_acc']:.3f} | {r['rare_acc']:.3f} | {r['other_acc']:.3f} | "
            f"{f(r['usage_entropy'], '.3f')} | {f(r['median_step_ms'], '.1f')} | {f(r['steps'], 'd')} |"
        )
    acc = pruning["accuracy"]
    rnd = acc["random"]
    mean = sum(rnd) / len(rnd)
    std = (sum((x - mean) ** 2 for x in rnd) / (len(rnd) - 1)) ** 0.5 if len(rnd) > 1 else 0.0
    lines += [
        "",
        f"Pruning {pruning['per_layer']} of 16 experts per layer ({pruning['ratio']:.0%}, mask mode), pre-trained model, "
        "accuracy over all skills weighted by frequency:",
        "",
        "| experts masked | accuracy |",
        "|---|---|",
        f"| none | {acc['unpruned'][0]:.3f} |",
        f"| least used | {acc['least_used'][0]:.3f} |",
        f"| random (mean ± std over seeds {pruning['seeds']}) | {mean:.3f} ± {std:.3f} |",
        f"| most used | {acc['most_used'][0]:.3f} |",
    ]
    return "\n".join(lines) + "\n"


def _savefig(fig, path: Path) -> None:
    """Save a figure atomically (temporary file in the same folder, then rename)."""
    tmp = path.with_name(f".{path.name}.tmp.png")
    fig.savefig(tmp, dpi=110)
    os.replace(tmp, path)


def plots(out: Path, table: list[dict], results: dict, base_acc: dict, pruning: dict, target: str) -> list[str]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = [r["method"].split(" ")[0] for r in table]
    fig, ax = plt.subplots(figsize=(8, 4))
    width = 0.27
    for j, (key, label) in enumerate([("target_acc", f"{target} (target)"), ("rare_acc", "rare skills"), ("other_acc", "other skills")]):
        ax.bar([i + (j - 1) * width for i in range(len(table))], [r[key] for r in table], width, label=label)
    ax.set_xticks(range(len(table)), names, rotation=20, fontsize=8)
    ax.set_ylabel("exact-match accuracy")
    ax.set_ylim(0, 1)
    ax.set_title(f"after fine-tuning on {target} alone")
    ax.legend(fontsize=8)
    fig.tight_layout()
    _savefig(fig, out / "methods.png")
    plt.close(fig)

    fig, ax = plt.subplots(figsize=(9, 4))
    skills = list(corpus.SKILL_NAMES)
    series = {"pre-trained": base_acc, **{m: r["accuracy"] for m, r in results.items()}}
    width = 0.8 / len(series)
    for j, (m, acc) in enumerate(series.items()):
        ax.bar([i + (j - len(series) / 2 + 0.5) * width for i in range(len(skills))], [acc[k] for k in skills], width, label=m)
    w = corpus.skill_weights()
    ax.set_xticks(range(len(skills)), [f"{k}\n{w[k]:.0%}" for k in skills], fontsize=8)
    ax.set_ylabel("exact-match accuracy")
    ax.set_title("accuracy per skill (corpus frequency below the name)")
    ax.set_ylim(0, 1.3)  # room for the legend above the bars
    ax.set_yticks([0, 0.2, 0.4, 0.6, 0.8, 1.0])
    ax.legend(fontsize=7, ncol=len(series), loc="upper center")
    fig.tight_layout()
    _savefig(fig, out / "skills.png")
    plt.close(fig)

    acc = pruning["accuracy"]
    fig, ax = plt.subplots(figsize=(5.5, 3.5))
    labels = ["none", "least used", "random", "most used"]
    vals = [acc["unpruned"], acc["least_used"], acc["random"], acc["most_used"]]
    means = [sum(v) / len(v) for v in vals]
    errs = [(sum((x - m) ** 2 for x in v) / (len(v) - 1)) ** 0.5 if len(v) > 1 else 0 for v, m in zip(vals, means)]
    ax.bar(labels, means, yerr=errs, capsize=4, color=["grey", "tab:green", "tab:orange", "tab:red"])
    ax.set_ylabel("accuracy (all skills, weighted)")
    ax.set_ylim(0, 1)
    ax.set_title(f"masking {pruning['ratio']:.0%} of the experts per layer")
    fig.tight_layout()
    _savefig(fig, out / "pruning.png")
    plt.close(fig)
    return ["methods.png", "skills.png", "pruning.png", "profile/usage_heatmap.png"]


# ---- entry point --------------------------------------------------------------------------
def run_demo(out: str | os.PathLike = "outputs/demo", quick: bool = False, threads: int | None = 1) -> dict:
    """Run every step; return the results dict also written to `<out>/results.json`.
    `threads`: torch CPU threads (None: torch's default). One is the default: the demo's
    matrices are small, and extra threads mostly add contention on a shared machine."""
    from transformers import AutoModelForCausalLM

    s = QUICK if quick else DemoSettings()
    out = Path(out)
    if threads is not None:
        if threads < 1:
            raise ConfigError(f"threads={threads}: give a positive number of torch threads")
        torch.set_num_threads(threads)
    _prepare_out(out)
    t0 = time.perf_counter()
    torch.manual_seed(s.seed)
    tokenizer = corpus.tokenizer()
    evalset = corpus.eval_set(s.eval_per_skill, seed=s.seed + 100)

    base, step_s, pre = pretrain(out, s, tokenizer, evalset)
    model = AutoModelForCausalLM.from_pretrained(base)
    base_acc = skill_accuracy(model, tokenizer, evalset)
    pruning = prune_compare(model, tokenizer, s, evalset, out)
    entropy_texts = [f"<s>{q}={a}</s>" for pairs in evalset.values() for q, a in pairs]
    base_entropy = usage_entropy(model, tokenizer, entropy_texts)
    del model

    # Every method trains the same number of steps: what pre-training's step rate fits in the budget.
    steps = max(int(s.finetune_seconds / step_s), 4)
    results = finetune_all(base, out, s, steps, tokenizer, evalset, entropy_texts)

    table = rows(results, base_acc, s.target)
    table[0]["usage_entropy"] = base_entropy
    w = corpus.skill_weights()
    md = markdown(table, s.target, rare_skills(s.target), pruning)
    report = {
        "settings": {**dataclasses.asdict(s), "quick": quick, "finetune_steps": steps, "model": MODEL,
                     "skill_frequencies": w},  # fmt: skip
        "machine": {"platform": platform.platform(), "cpus": os.cpu_count(), "torch": torch.__version__,
                    "threads": torch.get_num_threads(), "load_average": list(os.getloadavg())},  # fmt: skip
        "pretrain": {**pre, "accuracy": base_acc, "usage_entropy": base_entropy},
        "pruning": pruning,
        "methods": results,
        "table": table,
        "seconds": time.perf_counter() - t0,
    }
    figures = plots(out, table, results, base_acc, pruning, s.target)
    title = f"# moe-sft demo{' --quick' if quick else ''}\n\nFine-tuned on `{s.target}` alone, {steps} steps per method.\n\n"
    atomic_write_text(out / "results.md", title + md)
    atomic_write_text(out / "results.json", json.dumps(report, indent=2) + "\n")
    atomic_write_text(out / MARKER, json.dumps({"status": "done", "figures": figures}) + "\n")
    print("\n" + md)
    print(f"demo finished in {report['seconds']:.0f} s; results in {out}/results.md, plots {', '.join(figures)}")
    return report
