"""`moe-sft demo`: the whole project as a small study on a CPU in a few minutes, nothing downloaded.

1. a small Qwen3-MoE (`MODEL`) and a character-level tokenizer;
2. pre-training on the synthetic nine-skill corpus (`corpus.py`, Zipf frequencies) for a fixed
   number of optimizer steps with the family's load-balancing aux loss, saved as a stock
   checkpoint;
3. the pre-trained model's long tail: expert usage overall and per skill (heatmap), and what
   masking the least-used quarter of each layer's experts costs each skill, against random
   and most-used quarters;
4. fine-tuning on one rare skill alone (default `mul`) with every arm of `METHODS`, over several
   seeds, each run through `moe_sft.train.run_recipe` on YAMLs written to `<out>/configs/`
   (exactly `moe-sft train`); every run gets the same steps, data, lr and, per seed, the same
   data order;
5. per fine-tuned model: accuracy on the target, the rare and the other skills, and the claim
   under test: accuracy on the rare and on all skills with that model's own long tail (the
   least-used quarter of each layer, from a profile of that model) masked, against random
   quarters; mean ± std over seeds, differences beyond the noise marked (`stats.py`);
6. the RL arms (`RL_METHODS`): GRPO from the same pre-trained model on the same target prompts,
   exact-match reward, through `moe_sft.rl.train_rl` on `moe-sft rl` YAMLs in `<out>/configs/`,
   as many updates as the SFT arms, with and without the forking-token mask and routing
   replay; evaluated as in step 5, plus the reward, the mask's kept fraction and the routing
   mismatch between generation and training forward from the run's log.

Everything is budgeted in optimizer steps, on the CPU, with `threads` torch threads: the same
command gives the same numbers (`results.json`, timing and machine sections aside) on every run.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import platform
import shutil
import time
from pathlib import Path

import torch
import yaml

from ..config import ConfigError
from ..io import atomic_write_text
from . import corpus, report
from . import evaluate as ev
from .stats import mean_std

logger = logging.getLogger(__name__)

MARKER = "demo.json"  # marks a folder as a demo output (so a rerun may replace it)


@dataclasses.dataclass(frozen=True)
class Arm:
    """One fine-tuning arm: its moe_sft method blocks per phase. Each phase is one `moe-sft
    train` YAML naming the next in `then:`; the fine-tuning steps are split evenly between the
    phases, so every arm trains the same number of steps."""

    name: str
    phases: tuple[dict, ...] = ({},)


# The arms of the comparison, in table order; add one here and it is trained, evaluated,
# tabulated and plotted like the others.
METHODS: tuple[Arm, ...] = (
    Arm("vanilla"),
    Arm("frozen_router", ({"frozen_router": {}},)),
    Arm("densemixer", ({"densemixer": {}},)),
    Arm("esft", ({"esft": {"score": "token"}},)),
    # Phase 1 sparsifies with the router bias only; phase 2 adds one long-tail condenser per
    # layer (top-2 compute_neutral: 1 routed + 1 condenser), gamma 5e-5 as the paper's phase 2.
    Arm("condenser", ({"condenser": {}}, {"condenser": {"bias": {"gamma": 5.0e-5}, "condensers": {"num": 1}}})),
    Arm("moe_bias_head", ({"moe_bias_head": {"num_experts": 16, "top_k": 2}},)),
)
BASELINE = "vanilla"  # the arm every other arm's accuracies are compared with


@dataclasses.dataclass(frozen=True)
class RLArm:
    """One GRPO arm: `moe-sft rl` from the pre-trained model (every method off) on the target
    skill's prompts, with its forking-token mask (`grpo.top_entropy_quantile`: the policy loss
    on that top fraction of completion tokens by entropy; 1.0 = every token) and
    `routing_replay`. `seeds`: how many of the RL seeds it runs (None: all of them)."""

    name: str
    top_entropy_quantile: float
    routing_replay: str
    seeds: int | None = None


# The RL arms, in table order (data, as METHODS). The last one only measures the routing
# mismatch that replay removes (its run is otherwise the first's), so one seed is enough.
RL_METHODS: tuple[RLArm, ...] = (
    RLArm("grpo", 0.2, "rollout"),  # moe-sft rl's defaults: top 20% entropy tokens, rollout replay (R3)
    RLArm("grpo_no_mask", 1.0, "rollout"),  # the policy loss on every completion token
    RLArm("grpo_no_replay", 0.2, "none", seeds=1),  # the training forward routes by itself
)
RL_LOGGED = ("reward", "frac_reward_zero_std", "routing/mismatch", "routing/mismatch_replayed", "routing/mismatch_tokens",
             "entropy_mask/kept_fraction")  # fmt: skip


@dataclasses.dataclass(frozen=True)
class DemoSettings:
    pretrain_steps: int = 1000
    pretrain_lr: float = 3e-3  # AdamW, cosine with warm-up
    pretrain_warmup_steps: int = 50
    router_aux_loss_coef: float = 0.01  # pre-training's load-balancing loss (keeps the tail alive)
    finetune_steps: int = 150  # per run, split between an arm's phases
    finetune_lr: float = 1e-3  # AdamW, cosine
    finetune_batch_size: int = 32
    seeds: int = 3  # fine-tuning seeds: seed, seed + 1, ...
    batch_size: int = 64  # pre-training
    pretrain_records: int = 24000  # distinct training examples (repeated for longer runs)
    finetune_records: int = 3000
    eval_per_skill: int = 100
    profile_texts: int = 1000  # corpus texts (Zipf mix) each usage profile is taken on
    prune_ratio: float = 0.25
    prune_seeds: int = 3  # random masks per model
    rl_seeds: int = 2  # GRPO seeds per RL arm (seed, seed + 1, ...)
    rl_generations: int = 8  # completions per prompt (a GRPO group); finetune_batch_size completions per update
    target: str = "mul"
    seed: int = 0

    def __post_init__(self):
        if self.target not in corpus.SKILL_NAMES:
            raise ConfigError(f"demo target skill {self.target!r} is not one of {', '.join(corpus.SKILL_NAMES)}")
        if self.seeds < 1:
            raise ConfigError(f"--seeds {self.seeds}: give at least 1 fine-tuning seed (3 or more for a noise estimate)")
        if self.rl_seeds < 1:
            raise ConfigError(f"--rl-seeds {self.rl_seeds}: give at least 1 GRPO seed (2 or more for a noise estimate)")

    @property
    def finetune_seeds(self) -> list[int]:
        return [self.seed + i for i in range(self.seeds)]

    def rl_arm_seeds(self, arm: RLArm) -> list[int]:
        return [self.seed + i for i in range(min(self.rl_seeds, arm.seeds or self.rl_seeds))]


QUICK = DemoSettings(
    pretrain_steps=40, pretrain_warmup_steps=4, finetune_steps=4, seeds=2, pretrain_records=1000,
    finetune_records=200, finetune_batch_size=16, eval_per_skill=12, profile_texts=64, prune_seeds=2, rl_seeds=1,
)  # fmt: skip

MODEL = dict(  # Qwen3-MoE-shaped, ~1.0M parameters
    hidden_size=128, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, head_dim=32,
    intermediate_size=256, num_experts=8, num_experts_per_tok=2, moe_intermediate_size=128,
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


def _write_yaml(path: Path, data: dict, command: str = "train") -> Path:
    atomic_write_text(path, f"# moe-sft {command} {path}\n" + yaml.safe_dump(data, sort_keys=False))
    return path


def _recipe(model_path: str, data_file: str, out_dir: Path, *, batch: int, lr: float, steps: int, seed: int,
            blocks: dict, warmup: int = 0) -> dict:  # fmt: skip
    return {
        "model": {"path": model_path},
        "data": {"files": [data_file], "format": "messages", "max_length": 32},
        **blocks,
        "training": {
            "output_dir": str(out_dir), "max_steps": steps, "per_device_train_batch_size": batch,
            "learning_rate": lr, "lr_scheduler_type": "cosine", "warmup_steps": warmup, "weight_decay": 0.0,
            "logging_steps": max(steps // 5, 1), "save_strategy": "no", "report_to": "none", "seed": seed,
            "data_seed": seed, "dataloader_drop_last": True, "dataloader_pin_memory": False, "use_cpu": True,
            "disable_tqdm": True,
        },  # fmt: skip
    }


def texts(pairs) -> list[str]:
    return [f"<s>{q}={a}</s>" for q, a in pairs]


# ---- the steps ----------------------------------------------------------------------------
def _prepare_out(out: Path) -> None:
    """A fresh output folder; a previous demo's is replaced, anything else is refused."""
    if out.exists() and any(out.iterdir()):
        if not (out / MARKER).is_file():
            raise FileExistsError(f"{out} exists and is not a moe-sft demo output folder; choose another --out")
        shutil.rmtree(out)
    out.mkdir(parents=True, exist_ok=True)
    atomic_write_text(out / MARKER, json.dumps({"status": "running"}) + "\n")


def pretrain(out: Path, s: DemoSettings, tokenizer, held_out: frozenset) -> tuple[Path, dict, dict]:
    """Random init -> `train()` for `pretrain_steps` -> stock checkpoint `<out>/pretrained`.
    Returns that folder, a summary and its timing."""
    from ..patching import get_handle
    from ..pretrained import from_pretrained
    from ..train import load_train_config, train
    from ..train.callbacks import StepTimer

    data = _write_jsonl(out / "data" / "pretrain.jsonl", corpus.sample(s.pretrain_records, s.seed, exclude=held_out))
    init = out / "init"
    model = build_model(tokenizer, s.seed)
    model.save_pretrained(init)
    tokenizer.save_pretrained(init)
    n_params = sum(p.numel() for p in model.parameters())
    cfg = _recipe(str(init), data, out / "pretrain", batch=s.batch_size, lr=s.pretrain_lr, steps=s.pretrain_steps,
                  seed=s.seed, blocks={"router_aux_loss_coef": s.router_aux_loss_coef}, warmup=s.pretrain_warmup_steps)  # fmt: skip
    path = _write_yaml(out / "configs" / "pretrain.yaml", cfg)
    logger.info("demo: pre-training %.2fM parameters for %d steps", n_params / 1e6, s.pretrain_steps)
    timer, t0 = StepTimer(), time.perf_counter()
    final = train(load_train_config(path), callbacks=(timer,))
    seconds = time.perf_counter() - t0
    # train() saves a patched checkpoint (every method off); keep a stock one as the base that
    # every arm's run patches in its own way.
    model = from_pretrained(final)
    get_handle(model).revert()
    pretrained = out / "pretrained"
    model.save_pretrained(pretrained)
    tokenizer.save_pretrained(pretrained)
    summary = {"parameters": n_params, "steps": len(timer.times), "records": s.pretrain_records}
    return pretrained, summary, {"seconds": seconds, "median_step_ms": 1000 * timer.median()}


def study_pretrained(model, tokenizer, s: DemoSettings, evalset, out: Path, profile_texts: list[str]) -> dict:
    """The pre-trained model's long tail: usage profile (written to `<out>/profile`), each
    skill's routing (on its evaluation questions), the share of it that reaches the least-used
    experts, and accuracy with least-used / most-used / random experts masked."""
    from ..pruning import select_experts, write_profile

    prof = ev.profile(model, tokenizer, profile_texts, "pretrained")
    write_profile(prof, out / "profile", overwrite=True)
    tail = select_experts(prof, "least_used", ratio=s.prune_ratio)
    routing = ev.skill_routing(model, tokenizer, {k: texts(v) for k, v in evalset.items()})
    pruning = ev.prune_compare(model, tokenizer, evalset, prof, ratio=s.prune_ratio, seeds=s.prune_seeds,
                               strategies=("least_used", "most_used"))  # fmt: skip
    return {
        "accuracy": ev.skill_accuracy(model, tokenizer, evalset),
        "usage_entropy": ev.usage_entropy(prof),
        "layers": prof.layers,
        "counts": prof.counts.tolist(),
        "tail": tail,
        "tail_share": ev.tail_share(prof.counts, tail, prof.layers),
        "skill_counts": {k: c.tolist() for k, c in routing.items()},
        "skill_tail_share": {k: ev.tail_share(c, tail, prof.layers) for k, c in routing.items()},
        "pruning": pruning,
    }


def _run_dir(out: Path, arm: Arm, seed: int, phase: int) -> Path:
    """finetune/<arm>/seed<k> for the last phase (the arm's model), seed<k>_phase<j> before it."""
    last = phase == len(arm.phases) - 1
    return out / "finetune" / arm.name / (f"seed{seed}" if last else f"seed{seed}_phase{phase + 1}")


def arm_yaml(arm: Arm, base: str, data: str, out: Path, s: DemoSettings, seed: int) -> Path:
    """The YAMLs of one arm and seed (configs/<arm>/seed<k>.yaml, later phases
    seed<k>_phase<j>.yaml, chained by `then:`); returns the first phase's."""
    n = len(arm.phases)
    steps = [s.finetune_steps // n + (1 if j < s.finetune_steps % n else 0) for j in range(n)]
    cfgs = out / "configs" / arm.name
    path = None
    for j in reversed(range(n)):  # last phase first, so each phase can name the next
        model_path = base if j == 0 else str(_run_dir(out, arm, seed, j - 1) / "final")
        cfg = _recipe(model_path, data, _run_dir(out, arm, seed, j), batch=s.finetune_batch_size, lr=s.finetune_lr,
                      steps=max(steps[j], 1), seed=seed, blocks=arm.phases[j])  # fmt: skip
        if path is not None:
            cfg["then"] = str(path)
        path = _write_yaml(cfgs / (f"seed{seed}.yaml" if j == 0 else f"seed{seed}_phase{j + 1}.yaml"), cfg)
    return path


def timed_run(seed: int, run):
    """`run(callbacks)` from a fixed RNG state (new parameters, e.g. moe_bias_head's, are
    initialised before the Trainer seeds itself), with a StepTimer among the callbacks: what it
    returns and {steps, seconds, median_step_ms}."""
    from ..train.callbacks import StepTimer

    torch.manual_seed(seed)
    timer, t0 = StepTimer(), time.perf_counter()
    result = run((timer,))
    return result, {"steps": len(timer.times), "seconds": time.perf_counter() - t0, "median_step_ms": 1000 * timer.median()}


def finetune_run(path: Path, seed: int) -> tuple[Path, dict]:
    """`run_recipe(path)` (`timed_run`): the final model folder of its last phase and the step timing."""
    from ..train import run_recipe

    return timed_run(seed, lambda callbacks: run_recipe(path, callbacks=callbacks)[-1])


def evaluate_finetuned(final: Path, tokenizer, evalset, profile_texts: list[str], s: DemoSettings) -> dict:
    """Accuracy of one fine-tuned model, its usage entropy, and accuracy with its own long tail
    (least-used experts of a profile of this model) or random experts masked."""
    from ..pretrained import from_pretrained

    model = from_pretrained(final)
    prof = ev.profile(model, tokenizer, profile_texts, str(final))
    pruning = ev.prune_compare(model, tokenizer, evalset, prof, ratio=s.prune_ratio, seeds=s.prune_seeds)
    return {
        "accuracy": ev.skill_accuracy(model, tokenizer, evalset),
        "usage_entropy": ev.usage_entropy(prof),
        "tail": pruning["least_used"],
        "random": pruning["random"],
    }


def target_pairs(s: DemoSettings, evalset) -> list[tuple[str, str]]:
    """The fine-tuning examples: `finetune_records` of the target skill, none an evaluation question."""
    held_out = frozenset(q for q, _ in evalset[s.target])
    return corpus.sample(s.finetune_records, s.seed + 2, skills={s.target: 1.0}, exclude=held_out)


def finetune_all(base: Path, out: Path, s: DemoSettings, tokenizer, evalset, pairs, profile_texts) -> tuple[dict, dict]:
    """Every arm x every seed: train on `pairs`, evaluate (profiles on `profile_texts`). Returns
    (results, timing), both {arm: [per seed]}."""
    data = _write_jsonl(out / "data" / f"finetune_{s.target}.jsonl", pairs)
    results, timing = {}, {}
    for arm in METHODS:
        for seed in s.finetune_seeds:
            path = arm_yaml(arm, str(base), data, out, s, seed)
            logger.info("demo: fine-tuning %s (seed %d) on %s for %d steps (%s)", arm.name, seed, s.target, s.finetune_steps, path)
            final, run_timing = finetune_run(path, seed)
            steps = run_timing.pop("steps")
            results.setdefault(arm.name, []).append({"seed": seed, "steps": steps, **evaluate_finetuned(final, tokenizer, evalset, profile_texts, s)})
            timing.setdefault(arm.name, []).append(run_timing)
    return results, timing


# ---- the RL arms ----------------------------------------------------------------------------
def rl_recipe(arm: RLArm, base: str, data_file: str, out_dir: Path, s: DemoSettings, seed: int, completion_len: int) -> dict:
    """The `moe-sft rl` YAML of one RL arm and seed: the SFT arms' number of updates, batch (as
    many completions as their batch has sequences: finetune_batch_size / rl_generations prompts
    per update), lr and schedule; no aux loss (as the SFT arms: their checkpoint has router
    logits off); fp32."""
    return {
        "model": {"path": base},
        "data": {"files": [data_file], "prompt_template": "chat", "max_length": 32},  # the demo's chat template
        "rewards": [{"type": "exact_match"}],
        "routing_replay": arm.routing_replay,
        "grpo": {
            "output_dir": str(out_dir), "max_steps": s.finetune_steps, "per_device_train_batch_size": s.finetune_batch_size,
            "num_generations": s.rl_generations, "max_completion_length": completion_len,
            "top_entropy_quantile": arm.top_entropy_quantile, "learning_rate": s.finetune_lr, "lr_scheduler_type": "cosine",
            "warmup_steps": 0, "weight_decay": 0.0, "router_aux_loss_coef": 0.0, "gradient_checkpointing": False, "bf16": False,
            "logging_steps": max(s.finetune_steps // 5, 1), "save_strategy": "no", "report_to": "none", "seed": seed,
            "data_seed": seed, "dataloader_pin_memory": False, "use_cpu": True, "disable_tqdm": True,
        },  # fmt: skip
    }


def rl_run(path: Path, seed: int) -> tuple[Path, dict, list[dict]]:
    """`train_rl` on the RL YAML at `path` (`timed_run`): the final model folder, the step timing
    and the log history."""
    from ..rl import load_rl_config, train_rl

    result, timing = timed_run(seed, lambda callbacks: train_rl(load_rl_config(path), callbacks=callbacks))
    return result.final_dir, timing, result.log_history


def rl_metrics(log_history: list[dict]) -> dict:
    """From a GRPO run's log: `RL_LOGGED` per logged step (`log`), the reward of the first and
    the last logged window, and the means over the logged windows (each one TRL's mean over its
    steps' training forwards) of the share of GRPO groups with a learning signal (rewards not all
    equal, so non-zero advantages), of the mask's kept fraction and of the routing mismatch:
    `mismatch` the router's own picks in the training forward against generation's (what the
    forward would use without replay), `mismatch_replayed` the experts it used, `mismatch_tokens`
    completion tokens with a difference in some layer. None where the run logged no such value
    (kept_fraction without the mask)."""
    log = [{"step": e["step"], **{k: e[k] for k in RL_LOGGED if k in e}} for e in log_history if "reward" in e]
    if not log:
        raise RuntimeError("the GRPO run logged no reward; it trained no step")

    def mean(key):
        values = [e[key] for e in log if key in e]
        return sum(values) / len(values) if values else None

    return {
        "reward_first": log[0]["reward"], "reward_last": log[-1]["reward"], "signal_groups": 1 - mean("frac_reward_zero_std"),
        "kept_fraction": mean("entropy_mask/kept_fraction"), "mismatch": mean("routing/mismatch"),
        "mismatch_replayed": mean("routing/mismatch_replayed"), "mismatch_tokens": mean("routing/mismatch_tokens"),
        "log": log,
    }  # fmt: skip


def completion_length(pairs) -> int:
    """GRPO's max_completion_length: the longest answer and EOS (one token per character)."""
    return max(len(a) for _, a in pairs) + 1


def rl_all(base: Path, out: Path, s: DemoSettings, tokenizer, evalset, pairs, profile_texts) -> tuple[dict, dict]:
    """Every RL arm x its seeds: GRPO, evaluate as the SFT arms (`evaluate_finetuned`), plus
    the run's `rl_metrics`. Returns (results, timing), both {arm: [per seed]}. The prompts are
    the SFT arms' examples `pairs` (the same questions), as `instruction` + `answer` records."""
    data = out / "data" / f"rl_{s.target}.jsonl"
    atomic_write_text(data, "".join(json.dumps({"instruction": q, "answer": a}) + "\n" for q, a in pairs))
    results, timing = {}, {}
    for arm in RL_METHODS:
        for seed in s.rl_arm_seeds(arm):
            run_dir = out / "finetune" / arm.name / f"seed{seed}"
            cfg = rl_recipe(arm, str(base), str(data), run_dir, s, seed, completion_length(pairs))
            path = _write_yaml(out / "configs" / arm.name / f"seed{seed}.yaml", cfg, command="rl")
            logger.info("demo: GRPO %s (seed %d) on %s for %d steps (%s)", arm.name, seed, s.target, s.finetune_steps, path)
            final, run_timing, log_history = rl_run(path, seed)
            steps = run_timing.pop("steps")
            evaluation = evaluate_finetuned(final, tokenizer, evalset, profile_texts, s)
            results.setdefault(arm.name, []).append({"seed": seed, "steps": steps, **evaluation, "rl": rl_metrics(log_history)})
            timing.setdefault(arm.name, []).append(run_timing)
    return results, timing


# ---- summary ------------------------------------------------------------------------------
def summarise(results: dict, target: str) -> dict:
    """{arm: {metric: mean_std over seeds}}: accuracy groups of the full model (target, rare,
    other, all), with the long tail masked (tail_rare, tail_all), with random experts masked
    (random_rare, random_all: each seed's mean over its random masks), and usage entropy."""
    out = {}
    for arm, runs in results.items():
        per_seed = [_seed_metrics(r, target) for r in runs]
        out[arm] = {k: mean_std([m[k] for m in per_seed]) for k in per_seed[0]}
    return out


def summarise_rl(results: dict) -> dict:
    """{RL arm: {rl metric: mean_std over seeds, or None where the run logged none}}."""
    out = {}
    for arm in RL_METHODS:
        runs = results[arm.name]
        out[arm.name] = {k: None if runs[0]["rl"][k] is None else mean_std([r["rl"][k] for r in runs])
                         for k in runs[0]["rl"] if k != "log"}  # fmt: skip
    return out


def _seed_metrics(run: dict, target: str) -> dict:
    full = ev.groups(run["accuracy"], target)
    tail = ev.groups(run["tail"]["accuracy"], target)
    rnd = [ev.groups(r["accuracy"], target) for r in run["random"]]
    mean = lambda key: sum(g[key] for g in rnd) / len(rnd)  # noqa: E731
    return {
        **full,
        "tail_rare": tail["rare"], "tail_all": tail["all"], "random_rare": mean("rare"), "random_all": mean("all"),
        "tail_loss_rare": full["rare"] - tail["rare"], "tail_loss_all": full["all"] - tail["all"],
        "random_loss_rare": full["rare"] - mean("rare"), "random_loss_all": full["all"] - mean("all"),
        "usage_entropy": run["usage_entropy"],
    }  # fmt: skip


def _machine(threads: int) -> dict:
    cpu = platform.processor()
    try:
        cpu = next(line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo") if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    return {"platform": platform.platform(), "cpu": cpu, "cpus": os.cpu_count(), "torch": torch.__version__,
            "threads": threads, "load_average_start": list(os.getloadavg())}  # fmt: skip


# ---- entry point --------------------------------------------------------------------------
def run_demo(out: str | os.PathLike = "outputs/demo", quick: bool = False, threads: int = 1, seeds: int | None = None,
             seed: int = 0, rl_seeds: int | None = None) -> dict:  # fmt: skip
    """Run every step; return the results dict also written to `<out>/results.json`.
    `threads`: torch CPU threads (the numbers are reproducible for a given count; one is the
    default: the matrices are small, and extra threads mostly contend on a shared machine).
    `seeds`: fine-tuning seeds (default 3; 2 with `quick`); `rl_seeds`: GRPO seeds per RL arm
    (default 2; 1 with `quick`); `seed`: the base seed of everything."""
    s = QUICK if quick else DemoSettings()
    s = dataclasses.replace(s, seeds=s.seeds if seeds is None else seeds, rl_seeds=s.rl_seeds if rl_seeds is None else rl_seeds,
                            seed=seed)  # fmt: skip
    if threads < 1:
        raise ConfigError(f"threads={threads}: give a positive number of torch threads")
    out = Path(out)
    _prepare_out(out)
    previous_threads = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        report_ = _study(out, s, quick, _machine(threads))
    finally:
        torch.set_num_threads(previous_threads)
    report_ = json.loads(json.dumps(report_))  # as results.json has it (str keys)
    figures = report.plots(out, report_)
    md = report.markdown(report_)
    atomic_write_text(out / "results.md", md)
    atomic_write_text(out / "results.json", json.dumps(report_, indent=2) + "\n")
    atomic_write_text(out / MARKER, json.dumps({"status": "done", "figures": figures}) + "\n")
    print("\n" + md)
    print(f"demo finished in {report_['timing']['seconds']:.0f} s; results in {out}/results.md, plots {', '.join(figures)}")
    return report_


def _study(out: Path, s: DemoSettings, quick: bool, machine: dict) -> dict:
    from transformers import AutoModelForCausalLM

    t0, cpu0 = time.perf_counter(), time.process_time()
    torch.manual_seed(s.seed)
    tokenizer = corpus.tokenizer()
    evalset = corpus.eval_set(s.eval_per_skill, seed=s.seed + 100)
    held_out = frozenset(q for pairs in evalset.values() for q, _ in pairs)

    base, pre, pre_timing = pretrain(out, s, tokenizer, held_out)
    model = AutoModelForCausalLM.from_pretrained(base)
    profile_texts = texts(corpus.sample(s.profile_texts, s.seed + 1))  # the corpus mix every usage profile is taken on
    pre.update(study_pretrained(model, tokenizer, s, evalset, out, profile_texts))
    del model
    t1 = time.perf_counter()
    pairs = target_pairs(s, evalset)
    results, ft_timing = finetune_all(base, out, s, tokenizer, evalset, pairs, profile_texts)
    t2, cpu2 = time.perf_counter(), time.process_time()
    rl_results, rl_timing = rl_all(base, out, s, tokenizer, evalset, pairs, profile_texts)
    machine["load_average_end"] = list(os.getloadavg())
    summary = summarise({**results, **rl_results}, s.target)
    rl_arms = [{**dataclasses.asdict(a), "seeds": s.rl_arm_seeds(a)} for a in RL_METHODS]
    return {
        "settings": {**dataclasses.asdict(s), "finetune_seeds": s.finetune_seeds, "quick": quick, "methods": [a.name for a in METHODS], "baseline": BASELINE,
                     "rl_methods": rl_arms, "rl_max_completion_length": completion_length(pairs), "model": MODEL,
                     "skill_frequencies": corpus.skill_weights(),
                     "rare_skills": ev.rare_skills(s.target)},  # fmt: skip
        "pretrain": pre,
        "methods": {**results, **rl_results},
        "summary": summary,
        "rl": summarise_rl(rl_results),
        "claim": report.claim(summary),
        "machine": machine,
        "timing": {"seconds": time.perf_counter() - t0, "cpu_seconds": time.process_time() - cpu0,
                   "pretrain": pre_timing, "pretrained_study_seconds": t1 - t0 - pre_timing["seconds"],
                   "finetune_seconds": t2 - t1, "rl_seconds": time.perf_counter() - t2,
                   "rl_cpu_seconds": time.process_time() - cpu2,
                   "finetune": {**ft_timing, **rl_timing}},  # fmt: skip
    }
