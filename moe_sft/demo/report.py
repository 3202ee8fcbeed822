"""The demo's report: the claim under test, results.md (also printed) and the plots."""

from __future__ import annotations

import os
from pathlib import Path

from . import corpus
from .stats import NOISE_RULE, exceeds_noise, mean_std

# The claim under test (arXiv 2604.23036): condensers consolidate the long tail, so the condenser
# model loses less than these arms when its own long tail is masked.
CLAIM = ("condenser", ("densemixer", "esft"))
# The RL arms' contrasts the report states: (what, arm a, arm b), a − b.
RL_CONTRASTS = (("the forking-token mask (ρ 0.2 vs 1.0)", "grpo", "grpo_no_mask"),
                ("routing replay (rollout vs none)", "grpo", "grpo_no_replay"))  # fmt: skip
GROUPS = (("target", "target"), ("rare", "rare skills"), ("other", "other skills"))
MARK = "†"  # differs from the baseline beyond the noise
TAIL_MARK = "‡"  # tail masked differs from random masked beyond the noise


# ---- the claim ------------------------------------------------------------------------------
def claim(summary: dict) -> dict | None:
    """Per metric (rare / all skills lost when the tail is masked): the subject's mean loss minus
    each rival's, whether it is beyond the noise, and a verdict: "supported" (less loss than every
    rival, beyond the noise), "contradicted" (more loss than some rival, beyond the noise),
    "within noise", or "no noise estimate" (one seed). None when the subject arm is not run."""
    subject, rivals = CLAIM
    rivals = [r for r in rivals if r in summary]
    if subject not in summary or not rivals:
        return None
    out = {"subject": subject, "rivals": rivals}
    for key in ("tail_loss_rare", "tail_loss_all"):
        a = summary[subject][key]
        cmp = {r: {"delta": a["mean"] - summary[r][key]["mean"], "beyond_noise": exceeds_noise(a, summary[r][key])} for r in rivals}
        out[key] = {"comparisons": cmp, "verdict": _verdict(cmp)}
    return out


def _verdict(cmp: dict) -> str:
    if any(c["beyond_noise"] is None for c in cmp.values()):
        return "no noise estimate"
    if all(c["delta"] < 0 and c["beyond_noise"] for c in cmp.values()):
        return "supported"
    if any(c["delta"] > 0 and c["beyond_noise"] for c in cmp.values()):
        return "contradicted"
    return "within noise"


def claim_text(r: dict) -> list[str]:
    c = r["claim"]
    if c is None:
        return []
    s = r["summary"]
    lines = []
    for key, what in (("tail_loss_rare", "rare skills"), ("tail_loss_all", "all skills")):
        losses = ", ".join(f"{a} {_ms(s[a][key])}" for a in [c["subject"], *c["rivals"]])
        deltas = "; ".join(f"{c['subject']} − {a}: {d['delta']:+.3f} ({_noise_word(d['beyond_noise'])})"
                           for a, d in c[key]["comparisons"].items())  # fmt: skip
        lines.append(f"- {what}: accuracy lost when the model's own long tail is masked: {losses}; {deltas} "
                     f"→ **{c[key]['verdict']}**.")  # fmt: skip
    return lines


def _noise_word(beyond: bool | None) -> str:
    return {True: "beyond the noise", False: "within the noise", None: "no noise estimate"}[beyond]


# ---- Markdown -------------------------------------------------------------------------------
def _ms(m: dict, fmt: str = ".3f") -> str:
    return format(m["mean"], fmt) if m["n"] == 1 else f"{m['mean']:{fmt}} ± {m['std']:{fmt}}"


def _pct(values) -> str:
    return " / ".join(f"{100 * v:.1f}%" for v in values)


def header(r: dict) -> list[str]:
    s, m, t = r["settings"], r["machine"], r["timing"]
    per_layer = len(next(iter(r["pretrain"]["tail"].values())))
    load = lambda xs: ", ".join(f"{x:.2f}" for x in xs)  # noqa: E731
    return [
        f"# moe-sft demo{' --quick' if s['quick'] else ''}",
        "",
        f"Pre-training: {r['pretrain']['steps']} optimizer steps (batch {s['batch_size']}, lr {s['pretrain_lr']:g} cosine, "
        f"aux loss {s['router_aux_loss_coef']:g}). Fine-tuning on `{s['target']}` alone: {s['finetune_steps']} steps per run "
        f"(batch {s['finetune_batch_size']}, lr {s['finetune_lr']:g} cosine), "
        f"{s['seeds']} seeds ({', '.join(map(str, s['finetune_seeds']))}). {s['model']['num_experts']} experts per layer, "
        f"top-{s['model']['num_experts_per_tok']}; the long tail = the {per_layer} least-used experts per layer "
        f"({s['prune_ratio']:.0%}); random control: {s['prune_seeds']} random masks of the same size per model.",
        "",
        f"Machine: {m['cpu']} ({m['cpus']} CPUs), {m['threads']} torch thread(s), torch {m['torch']}; load average "
        f"(1, 5, 15 min) {load(m['load_average_start'])} at the start, {load(m['load_average_end'])} at the end. "
        f"Wall time {t['seconds']:.0f} s (process CPU time {t['cpu_seconds']:.0f} s); pre-training "
        f"{t['pretrain']['seconds']:.0f} s at {t['pretrain']['median_step_ms']:.0f} ms/step (median), SFT fine-tuning and "
        f"evaluation {t['finetune_seconds']:.0f} s, the GRPO arms and their evaluation {t['rl_seconds']:.0f} s (CPU time "
        f"{t['rl_cpu_seconds']:.0f} s). Every number but these timings is the same on every run of this command with the "
        "same thread count.",
        "",
        f"Noise rule: a difference is marked when {NOISE_RULE}. The evaluation questions are fixed "
        f"({s['eval_per_skill']} per skill), so the seeds' spread does not include question-sampling noise "
        f"(±{(0.25 / s['eval_per_skill']) ** 0.5:.2f} binomial std per skill at accuracy 0.5).",
    ]


def tail_section(r: dict) -> list[str]:
    p, s = r["pretrain"], r["settings"]
    w = s["skill_frequencies"]
    rnd = p["pruning"]["random"]
    lines = [
        "",
        "## 1. The pre-trained model's long tail",
        "",
        f"The least-used experts receive {_pct(p['tail_share'])} of all expert selections (layer by layer; "
        f"uniform would be {s['prune_ratio']:.0%}); fewest selections of a tail expert: "
        f"{min(c[e] for c, layer in zip(p['counts'], p['layers']) for e in p['tail'][str(layer)])}.",
        "",
        "| skill | corpus share | accuracy | its selections reaching the tail (per layer) | tail masked | random masked | most used masked |",
        "|---|---|---|---|---|---|---|",
    ]
    for k in corpus.SKILL_NAMES:
        rm = mean_std([x["accuracy"][k] for x in rnd])
        lines.append(
            f"| {k} | {w[k]:.1%} | {p['accuracy'][k]:.2f} | {_pct(p['skill_tail_share'][k])} | "
            f"{p['pruning']['least_used']['accuracy'][k]:.2f} | {_ms(rm, '.2f')} | {p['pruning']['most_used']['accuracy'][k]:.2f} |"
        )
    return lines


def finetune_section(r: dict) -> list[str]:
    s, summ = r["settings"], r["summary"]
    base = summ.get(s["baseline"])
    rare = ", ".join(s["rare_skills"])
    lines = [
        "",
        f"## 2. Fine-tuning on `{s['target']}` alone (mean ± std over seeds; {MARK}: differs from {s['baseline']} beyond "
        "the noise; the grpo arms: section 4)",
        "",
        f"| arm | {s['target']} (target) | rare skills ({rare}) | other skills (weighted) | usage entropy | step (ms, timing) |",
        "|---|---|---|---|---|---|",
        "| pre-trained (no fine-tuning) | " + " | ".join(f"{x:.3f}" for x in _pre_groups(r)) + f" | {r['pretrain']['usage_entropy']:.3f} | — |",
    ]
    for arm, m in summ.items():
        cells = [_ms(m[g]) + (MARK if base and arm != s["baseline"] and exceeds_noise(m[g], base[g]) else "") for g, _ in GROUPS]
        step = mean_std([t["median_step_ms"] for t in r["timing"]["finetune"][arm]])
        lines.append(f"| {arm} | {' | '.join(cells)} | {_ms(m['usage_entropy'])} | {step['mean']:.0f} |")
    return lines


def _pre_groups(r: dict) -> list[float]:
    from .evaluate import groups

    g = groups(r["pretrain"]["accuracy"], r["settings"]["target"])
    return [g[k] for k, _ in GROUPS]


def pruning_section(r: dict) -> list[str]:
    lines = [
        "",
        "## 3. The claim under test: masking each fine-tuned model's own long tail",
        "",
        "Each fine-tuned model is profiled on the corpus mix; its least-used quarter of experts per layer (always-active "
        f"condensers excluded) is masked, against random masks of the same size. {TAIL_MARK}: tail masked and random "
        "masked differ beyond the noise.",
        "",
        "| arm | rare: full | rare: tail masked | rare: random masked | all: full | all: tail masked | all: random masked |",
        "|---|---|---|---|---|---|---|",
    ]
    for arm, m in r["summary"].items():
        cells = []
        for g in ("rare", "all"):
            mark = TAIL_MARK if exceeds_noise(m[f"tail_{g}"], m[f"random_{g}"]) else ""
            cells += [_ms(m[g]), _ms(m[f"tail_{g}"]) + mark, _ms(m[f"random_{g}"])]
        lines.append(f"| {arm} | {' | '.join(cells)} |")
    lines += ["", _tail_vs_random(r["summary"])]
    c = r["claim"]
    if c is not None:
        lines += ["", f"Claim: the {c['subject']} model loses less than {' and '.join(c['rivals'])} when its long tail is masked.", ""]
        lines += claim_text(r)
    return lines


def _tail_vs_random(summary: dict) -> str:
    """How many arms lose less (beyond the noise) from their own tail than from random masks."""
    parts = []
    for g, what in (("rare", "rare skills"), ("all", "all skills")):
        less = [a for a, m in summary.items() if m[f"tail_{g}"]["mean"] > m[f"random_{g}"]["mean"]
                and exceeds_noise(m[f"tail_{g}"], m[f"random_{g}"])]  # fmt: skip
        parts.append(f"{what}: {len(less)} of {len(summary)} ({', '.join(less) or 'none'})")
    return "Arms whose own long tail costs less than random experts, beyond the noise — " + "; ".join(parts) + "."


def rl_section(r: dict) -> list[str]:
    """The RL arms next to SFT vanilla: target, forgetting of the other skills, reward, the
    forking-token mask and the routing mismatch between generation and training forward."""
    s, summ, rl = r["settings"], r["summary"], r["rl"]
    arms = s["rl_methods"]
    pre = dict(zip((g for g, _ in GROUPS), _pre_groups(r)))
    seeds = "; ".join(f"{a['name']} {', '.join(map(str, a['seeds']))}" for a in arms)
    lines = [
        "",
        f"## 4. RL on `{s['target']}`: GRPO with an exact-match reward, the forking-token mask, routing replay",
        "",
        f"GRPO (`moe_sft.rl.train_rl`, TRL's GRPOTrainer) from the pre-trained model, every method off, on the SFT arms' "
        f"`{s['target']}` questions: {s['finetune_steps']} updates as the SFT arms, each on {s['finetune_batch_size']} "
        f"completions ({s['finetune_batch_size'] // s['rl_generations']} prompts × {s['rl_generations']} generations, "
        f"temperature 1, at most {s['rl_max_completion_length']} tokens: the longest "
        f"answer and EOS), reward 1 when the completion equals the answer; lr {s['finetune_lr']:g} cosine, no KL, no aux "
        f"loss, fp32. Seeds: {seeds}. ρ: the policy loss on the top-ρ "
        "completion tokens by entropy. Forgetting: the pre-trained model's accuracy on the other skills (weighted) "
        f"minus the arm's. Groups with a signal: the share of GRPO groups whose rewards are not all equal (only those "
        f"have non-zero advantages). {MARK}: differs from {s['baseline']} beyond the noise.",
        "",
        f"| arm | ρ | routing replay | {s['target']} (target) | other skills | forgetting | reward: first → last "
        "logged window | groups with a signal | tokens kept by the mask | mismatch: router's own picks vs generation | "
        "mismatch: experts used vs generation | tokens with a mismatch |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|",
        f"| pre-trained (no fine-tuning) | — | — | {pre['target']:.3f} | {pre['other']:.3f} | 0 |" + " — |" * 6,
    ]
    base = summ.get(s["baseline"])

    def cells(name: str) -> str:
        m = summ[name]
        mark = lambda g: MARK if base and name != s["baseline"] and exceeds_noise(m[g], base[g]) else ""  # noqa: E731
        forget = mean_std([pre["other"] - x for x in _group_values(r["methods"][name], s["target"], "other")])
        return f"{_ms(m['target'])}{mark('target')} | {_ms(m['other'])}{mark('other')} | {_ms(forget)}"

    if base:
        lines.append(f"| {s['baseline']} (SFT) | — | — | {cells(s['baseline'])} |" + " — |" * 6)
    for spec in arms:
        name, q = spec["name"], rl[spec["name"]]
        opt = lambda k, fmt=".3f": "—" if q[k] is None else _ms(q[k], fmt)  # noqa: E731
        lines.append(f"| {name} | {spec['top_entropy_quantile']:g} | {spec['routing_replay']} | {cells(name)} | "
                     f"{_ms(q['reward_first'])} → {_ms(q['reward_last'])} | {_ms(q['signal_groups'])} | {opt('kept_fraction')} | "
                     f"{opt('mismatch', '.4f')} | {opt('mismatch_replayed', '.4f')} | {opt('mismatch_tokens', '.4f')} |")  # fmt: skip
    return lines + ["", *rl_comparisons(r)]


def _group_values(runs: list[dict], target: str, group: str) -> list[float]:
    """One accuracy group of each run (seed)."""
    from .evaluate import groups

    return [groups(x["accuracy"], target)[group] for x in runs]


def rl_comparisons(r: dict) -> list[str]:
    """Each RL contrast on the seeds both arms ran (seed k of either arm starts from the same
    data order and sampling seed): the difference of target and other-skill accuracy, under the
    noise rule, and whether the runs gave identical accuracies on every skill."""
    out = []
    for what, a, b in RL_CONTRASTS:
        runs = {arm: {x["seed"]: x for x in r["methods"].get(arm, [])} for arm in (a, b)}
        common = sorted(set(runs[a]) & set(runs[b]))
        if not common:
            continue
        parts = []
        for g, label in (("target", r["settings"]["target"]), ("other", "other skills")):
            ma, mb = (mean_std(_group_values([runs[arm][k] for k in common], r["settings"]["target"], g)) for arm in (a, b))
            parts.append(f"{label} {ma['mean'] - mb['mean']:+.3f} ({_noise_word(exceeds_noise(ma, mb))})")
        same = all(runs[a][k]["accuracy"] == runs[b][k]["accuracy"] for k in common)
        out.append(f"- {what}, seed(s) {', '.join(map(str, common))}: {a} − {b}: {'; '.join(parts)}"
                   + ("; identical accuracies on every skill." if same else "."))  # fmt: skip
    return out


def markdown(r: dict) -> str:
    return "\n".join(header(r) + tail_section(r) + finetune_section(r) + pruning_section(r) + rl_section(r)) + "\n"


# ---- plots ----------------------------------------------------------------------------------
def _savefig(fig, path: Path) -> None:
    """Save a figure atomically (temporary file in the same folder, then rename)."""
    tmp = path.with_name(f".{path.name}.tmp.png")
    fig.savefig(tmp, dpi=110)
    os.replace(tmp, path)


def _plt():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def plot_methods(out: Path, r: dict) -> str:
    plt = _plt()
    summ, target = r["summary"], r["settings"]["target"]
    names = ["pre-trained", *summ]
    pre = _pre_groups(r)
    fig, ax = plt.subplots(figsize=(10, 4))
    width = 0.27
    for j, (key, label) in enumerate(GROUPS):
        means = [pre[j]] + [summ[a][key]["mean"] for a in summ]
        errs = [0] + [summ[a][key]["std"] for a in summ]
        ax.bar([i + (j - 1) * width for i in range(len(names))], means, width, yerr=errs, capsize=2,
               label=f"{target} (target)" if key == "target" else label)  # fmt: skip
    ax.set_xticks(range(len(names)), names, rotation=20, fontsize=8)
    ax.set_ylabel("exact-match accuracy")
    ax.set_ylim(0, 1)
    ax.set_title(f"after fine-tuning on {target} alone: SFT ({r['settings']['seeds']} seeds) and GRPO arms "
                 "(mean ± std over seeds)")  # fmt: skip
    ax.legend(fontsize=8)
    fig.tight_layout()
    _savefig(fig, out / "methods.png")
    plt.close(fig)
    return "methods.png"


def plot_pruning(out: Path, r: dict) -> str:
    """Per arm: accuracy of the model, with its long tail masked, with random experts masked."""
    plt = _plt()
    summ = r["summary"]
    fig, axes = plt.subplots(1, 2, figsize=(11, 4), sharey=True)
    width = 0.27
    for ax, g in zip(axes, ("rare", "all")):
        for j, (key, label) in enumerate(((g, "not masked"), (f"tail_{g}", "own long tail masked"), (f"random_{g}", "random masked"))):
            ax.bar([i + (j - 1) * width for i in range(len(summ))], [summ[a][key]["mean"] for a in summ], width,
                   yerr=[summ[a][key]["std"] for a in summ], capsize=2, label=label)  # fmt: skip
        ax.set_xticks(range(len(summ)), list(summ), rotation=20, fontsize=8)
        ax.set_title(f"{'rare skills' if g == 'rare' else 'all skills (weighted)'}")
        ax.set_ylim(0, 1)
    axes[0].set_ylabel("exact-match accuracy")
    axes[0].legend(fontsize=8)
    fig.suptitle(f"masking {r['settings']['prune_ratio']:.0%} of each fine-tuned model's experts per layer", fontsize=10)
    fig.tight_layout()
    _savefig(fig, out / "pruning.png")
    plt.close(fig)
    return "pruning.png"


def plot_routing(out: Path, r: dict) -> str:
    """Per MoE layer: each skill's share of selections per expert (experts sorted by overall
    use, the long tail right of the dashed line), pre-trained model."""
    import numpy as np

    plt = _plt()
    p, w = r["pretrain"], r["settings"]["skill_frequencies"]
    counts = np.array(p["counts"], dtype=float)
    L, E = counts.shape
    fig, axes = plt.subplots(1, L, figsize=(4.5 * L + 1, 4.2), squeeze=False)
    for row, (ax, layer) in enumerate(zip(axes[0], p["layers"])):
        order = np.argsort(-counts[row], kind="stable")
        grid = np.array([np.array(p["skill_counts"][k][row], dtype=float)[order] for k in corpus.SKILL_NAMES])
        grid /= grid.sum(1, keepdims=True).clip(min=1)
        im = ax.imshow(grid, aspect="auto", cmap="magma", vmin=0, vmax=0.5)
        ax.axvline(E - len(p["tail"][str(layer)]) - 0.5, color="white", ls="--", lw=1.2)
        overall = counts[row][order] / counts[row].sum()
        ax.set_xticks(range(E), [f"{e}\n{100 * s:.0f}%" for e, s in zip(order, overall)], fontsize=7)
        labels = [f"{k} ({w[k]:.0%})" for k in corpus.SKILL_NAMES] if row == 0 else []
        ax.set_yticks(range(len(corpus.SKILL_NAMES)) if row == 0 else [], labels, fontsize=8)
        ax.set_title(f"layer {layer}: experts by overall use (id, share)", fontsize=9)
    fig.colorbar(im, ax=axes[0].tolist(), label="share of the skill's selections", extend="max")
    fig.suptitle("pre-trained model: where each skill's tokens are routed (long tail right of the dashed line)", fontsize=10)
    _savefig(fig, out / "routing.png")
    plt.close(fig)
    return "routing.png"


def plot_skills(out: Path, r: dict) -> str:
    plt = _plt()
    skills, w = list(corpus.SKILL_NAMES), r["settings"]["skill_frequencies"]
    series = {"pre-trained": r["pretrain"]["accuracy"]}
    for arm, runs in r["methods"].items():
        series[arm] = {k: sum(x["accuracy"][k] for x in runs) / len(runs) for k in skills}
    fig, ax = plt.subplots(figsize=(9, 4))
    width = 0.8 / len(series)
    for j, (m, acc) in enumerate(series.items()):
        ax.bar([i + (j - len(series) / 2 + 0.5) * width for i in range(len(skills))], [acc[k] for k in skills], width, label=m)
    ax.set_xticks(range(len(skills)), [f"{k}\n{w[k]:.0%}" for k in skills], fontsize=8)
    ax.set_ylabel("exact-match accuracy (mean over seeds)")
    ax.set_title("accuracy per skill (corpus frequency below the name)")
    ax.set_ylim(0, 1.4)  # room for the legend (two rows) above the bars
    ax.set_yticks([0, 0.2, 0.4, 0.6, 0.8, 1.0])
    ax.legend(fontsize=7, ncol=(len(series) + 1) // 2, loc="upper center")
    fig.tight_layout()
    _savefig(fig, out / "skills.png")
    plt.close(fig)
    return "skills.png"


def plots(out: Path, r: dict) -> list[str]:
    return [f(out, r) for f in (plot_methods, plot_pruning, plot_routing, plot_skills)] + ["profile/usage_heatmap.png"]
