"""`moe-sft train ... --dry-run`: plans of the real configs (meta device), of tiny recipes against
the real patched model, the memory model's scaling, and bad input."""

import dataclasses
import json
from pathlib import Path

import pytest

from moe_sft.cli import main
from moe_sft.config import ConfigError
from moe_sft.data.records import DataError
from moe_sft.methods import esft
from moe_sft.patching import extend_patch, patch_model
from moe_sft.pretrained import save_pretrained
from moe_sft.testing import tiny_model, tiny_tokenizer
from moe_sft.train.config import load_train_config, resolve_path
from moe_sft.train.data import build_dataset
from moe_sft.train.plan import headline, plan_recipe
from moe_sft.train.trainer import _profile_batches, load_tokenizer

ROOT = Path(__file__).resolve().parents[1]
CONFIGS = ROOT / "tests" / "data" / "configs"  # config.json of the published checkpoints
TINY = ROOT / "configs" / "tiny"


def _term(plan, name):
    return next(t for t in plan.memory.terms if t.name == name)


def _dry_run(capsys, *args):
    code = main(["train", *map(str, args), "--dry-run"])
    out = capsys.readouterr()
    return code, out.out, out.err


# ---- the published checkpoints, on the meta device ---------------------------------------------
@pytest.mark.parametrize(
    "yaml, checkpoint, published",
    [
        ("configs/qwen3_moe/30b_a3b_vanilla.yaml", "Qwen3-30B-A3B", 30.5e9),
        ("configs/deepseek_v2_lite/16b_vanilla.yaml", "DeepSeek-V2-Lite", 15.7e9),
        ("configs/deepseek_v3/671b_condenser_phase1.yaml", "DeepSeek-V3", 671e9),
    ],
)
def test_dry_run_of_real_configs_counts_the_published_totals(capsys, yaml, checkpoint, published):
    code, out, _ = _dry_run(capsys, ROOT / yaml, f"model.path={CONFIGS / checkpoint}", "--json", "--world-size", "8")
    assert code == 0
    plans = json.loads(out)
    for plan in plans:  # every phase of the recipe
        assert abs(plan["total"] - published) <= 0.01 * published, (plan["total"], published)
        assert plan["data"] is None and any("data not available" in w for w in plan["warnings"])
    if checkpoint == "DeepSeek-V3":
        assert [layer["experts"] for layer in plans[0]["moe_layers"]] == [256]
        assert plans[0]["dense_layers"] == [0, 1, 2]
        assert any("quantized" in w for w in plans[0]["warnings"])  # the hub checkpoint is FP8
        assert plans[1]["moe_layers"][0]["routed"] == 6 and plans[1]["moe_layers"][0]["always_active"] == 2


@pytest.mark.parametrize(
    "yaml, checkpoint",
    [
        ("configs/qwen3_moe/30b_a3b_esft_token.yaml", "Qwen3-30B-A3B"),
        ("configs/deepseek_v2_lite/16b_condenser_phase1.yaml", "DeepSeek-V2-Lite"),
        ("configs/deepseek_v3/671b_condenser_phase1.yaml", "DeepSeek-V3"),
    ],
)
def test_shipped_yaml_states_its_plan(yaml, checkpoint):
    line = next(line for line in (ROOT / yaml).read_text().splitlines() if line.startswith("# Plan ("))
    world_size = int(line.split("--world-size ")[1].split(",")[0])
    plan = plan_recipe(ROOT / yaml, [f"model.path={CONFIGS / checkpoint}"], world_size=world_size)[0]
    assert line.endswith("): " + headline(plan))


def test_text_plan_names_the_numbers(capsys):
    code, out, _ = _dry_run(capsys, ROOT / "configs/qwen3_moe/30b_a3b_densemixer.yaml", f"model.path={CONFIGS / 'Qwen3-30B-A3B'}")
    assert code == 0
    assert "30.53B total" in out and "layers 0-47 (48): 128 experts" in out and "densemixer (fast)" in out
    assert "peak estimate" in out and "headline:" in out


# ---- tiny recipes: the plan's counts are the real patched model's ------------------------------
def _real(cfg, methods):
    """The tiny model built for real, patched and wrapped as the run does; (total, trainable)."""
    model = tiny_model(cfg.model.tiny, experts_implementation=cfg.model.experts_implementation)
    handle = patch_model(model, methods)
    for method, _ in handle.methods():
        model = method.wrap(model, handle, handle.state.get(method.name))
    params = list(model.parameters())
    if handle.config.esft is not None:  # ESFT's slices of the fused tensors
        return sum(p.numel() for p in params), esft.trainable_parameters(model)
    trainable = sum(p.numel() for p in params if p.requires_grad)
    return sum(p.numel() for p in params), trainable


@pytest.mark.parametrize(
    "name, overrides",
    [
        ("qwen3_moe_vanilla", []),
        ("qwen3_moe_frozen_router", []),
        ("qwen3_moe_densemixer", []),
        ("qwen3_moe_moe_bias_head", []),
        ("qwen3_moe_lora", []),
        ("qwen3_moe_moe_bias_head",
         ["moe_bias_head.freeze_base=true", "condenser.condensers.source=new", "condenser.condensers.num=1"]),
    ],
)
def test_planned_counts_equal_the_real_patched_model(name, overrides):
    path = TINY / f"{name}.yaml"
    (plan,) = plan_recipe(path, overrides)
    cfg = load_train_config(path, overrides)
    methods = cfg.methods
    if methods.condenser is not None:  # the placeholder the plan used (source new needs a long tail)
        ids = {i: [0] for i in range(2)}
        methods = dataclasses.replace(methods, condenser=dataclasses.replace(
            methods.condenser, condensers=dataclasses.replace(methods.condenser.condensers, experts=ids)))  # fmt: skip
    total, trainable = _real(cfg, methods)
    assert (plan.total, plan.trainable, plan.trainable_min) == (total, trainable, None)
    assert plan.data is not None and plan.data.records == 64  # the bundled data, read by the loader


def test_esft_with_a_selection_file_is_exact(tmp_path):
    selection = tmp_path / "sel.json"
    esft.save_selection(selection, {0: [1, 5], 1: [2]})
    path = TINY / "qwen3_moe_esft_token.yaml"
    (plan,) = plan_recipe(path, [f"esft.selection_file={selection}"])
    cfg = load_train_config(path, [f"esft.selection_file={selection}"])
    assert (plan.total, plan.trainable) == _real(cfg, cfg.methods)
    assert plan.optimized > plan.trainable  # the optimizer holds the fused tensors whole


def test_esft_to_be_profiled_is_planned_as_a_bound_the_real_profile_respects(tmp_path):
    path = TINY / "qwen3_moe_esft_token.yaml"
    overrides = [f"training.output_dir={tmp_path / 'out'}"]
    (plan,) = plan_recipe(path, overrides)
    assert plan.trainable_min < plan.trainable and any("selection to be profiled" in n for n in plan.notes)
    cfg = load_train_config(path, overrides)
    model = tiny_model(cfg.model.tiny, experts_implementation=cfg.model.experts_implementation)
    dataset = build_dataset(load_tokenizer(cfg), cfg.data, lambda n: resolve_path(cfg, n))
    esft.profile_and_select(model, _profile_batches(cfg, dataset)(), cfg.methods.esft, tmp_path / "sel.json", progress=False)
    methods = dataclasses.replace(cfg.methods, esft=dataclasses.replace(cfg.methods.esft, selection_file=str(tmp_path / "sel.json")))
    handle = patch_model(model, methods)
    assert plan.trainable_min <= esft.trainable_parameters(model) <= plan.trainable
    handle.revert()


def test_two_phase_recipe_plans_phase_two_from_phase_one():
    phase1, phase2 = plan_recipe(TINY / "qwen3_moe_condenser_phase1.yaml")
    assert phase2.phase == 2 and phase2.model == phase1.model
    cfg1 = load_train_config(TINY / "qwen3_moe_condenser_phase1.yaml")
    cfg2 = load_train_config(TINY / "qwen3_moe_condenser_phase2.yaml")
    model = tiny_model("qwen3_moe", experts_implementation="eager")
    handle = patch_model(model, cfg1.methods)
    c = cfg2.methods.condenser
    experts = {i: [0, 1] for i in range(2)}  # chosen from the trained bias in a run: any two here
    extend_patch(handle, dataclasses.replace(cfg2.methods, condenser=dataclasses.replace(
        c, condensers=dataclasses.replace(c.condensers, experts=experts))))  # fmt: skip
    assert phase2.total == sum(p.numel() for p in model.parameters())
    k = model.config.num_experts_per_tok
    assert (phase2.moe_layers[0].routed, phase2.moe_layers[0].always_active) == (k - 2, 2)
    assert any("forced" in a.name for a in phase2.added) and not any("forced" in a.name for a in phase1.added)


def test_a_saved_phase_one_checkpoint_is_planned_from_its_own_config(tmp_path):
    cfg1 = load_train_config(TINY / "qwen3_moe_condenser_phase1.yaml")
    model = tiny_model("qwen3_moe", experts_implementation="eager")
    patch_model(model, cfg1.methods)
    save_pretrained(model, tmp_path / "final", tokenizer=tiny_tokenizer())
    (alone,) = plan_recipe(TINY / "qwen3_moe_condenser_phase2.yaml", [f"model.path={tmp_path / 'final'}"])
    _, chained = plan_recipe(TINY / "qwen3_moe_condenser_phase1.yaml")
    same = ("total", "trainable", "added", "moe_layers", "methods")
    assert [getattr(alone, k) for k in same] == [getattr(chained, k) for k in same]
    assert any("logit_bias" in a.name for a in alone.added)  # the saved phase-1 bias, extended by phase 2


# ---- the memory model -------------------------------------------------------------------------
def test_zero3_weights_scale_as_one_over_world_size():
    path = ROOT / "configs/qwen3_moe/30b_a3b_vanilla.yaml"
    over = [f"model.path={CONFIGS / 'Qwen3-30B-A3B'}"]
    plans = {n: plan_recipe(path, over, world_size=n)[0] for n in (1, 2, 8)}
    for n in (2, 8):
        for term in ("weights", "gradients", "optimizer states"):
            assert _term(plans[1], term).gpu == n * _term(plans[n], term).gpu, term
        assert _term(plans[n], "buffers (replicated)").gpu == _term(plans[1], "buffers (replicated)").gpu
    assert _term(plans[1], "weights").gpu == plans[1].total * 2  # bf16
    assert _term(plans[1], "optimizer states").gpu == plans[1].optimized * 12  # fp32 master + 2 moments
    zero2 = plan_recipe(path, over + ["deepspeed=configs/deepspeed/zero2.json"], world_size=8)[0]
    assert _term(zero2, "weights").gpu == _term(plans[1], "weights").gpu  # ZeRO-2 keeps whole weights
    assert _term(zero2, "gradients").gpu == _term(plans[8], "gradients").gpu


def test_offload_moves_optimizer_and_parameters_to_cpu():
    path = ROOT / "configs/qwen3_moe/30b_a3b_vanilla.yaml"
    over = [f"model.path={CONFIGS / 'Qwen3-30B-A3B'}"]
    on_gpu = plan_recipe(path, over, world_size=8)[0]
    offload = plan_recipe(path, over + ["deepspeed=configs/deepspeed/zero3_offload_param.json"], world_size=8)[0]
    for term in ("weights", "optimizer states"):
        assert (_term(offload, term).gpu, _term(offload, term).cpu) == (0, _term(on_gpu, term).gpu)
    assert offload.memory.gpu_peak < on_gpu.memory.gpu_peak and offload.memory.cpu > 0


def test_densemixer_modes_and_checkpointing():
    path = ROOT / "configs/qwen3_moe/30b_a3b_densemixer.yaml"
    over = [f"model.path={CONFIGS / 'Qwen3-30B-A3B'}"]
    fast = plan_recipe(path, over)[0]
    kept = _term(fast, "densemixer (fast): dense pass kept").gpu
    assert kept == 128 * 4 * 1024 * 768 * 2  # E x T x min(I, H) x bf16, one recomputed layer
    no_ckpt = plan_recipe(path, over + ["training.gradient_checkpointing=false"])[0]
    assert _term(no_ckpt, "densemixer (fast): dense pass kept").gpu == 48 * kept
    recompute = plan_recipe(path, over + ["densemixer.memory=recompute"])[0]
    assert not any(t.name.startswith("densemixer (fast)") for t in recompute.memory.terms)
    assert _term(recompute, "densemixer: all-experts chunk (transient)").gpu == 2 * 128 * 512 * 2048 * 2


# ---- what a dry run does not do, and bad input ---------------------------------------------------
def test_nothing_is_written(tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    out = tmp_path / "out"
    code, text, _ = _dry_run(capsys, TINY / "qwen3_moe_esft_token.yaml", f"training.output_dir={out}")
    assert code == 0 and "plan of" in text
    assert not out.exists() and list(tmp_path.iterdir()) == []


def test_missing_data_is_a_warning_malformed_data_an_error(tmp_path):
    path = TINY / "qwen3_moe_vanilla.yaml"
    (plan,) = plan_recipe(path, [f"data.files=[{tmp_path / 'absent.jsonl'}]"])
    assert plan.data is None and "absent.jsonl" in plan.warnings[0]
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"instruction": "x"}\n')
    with pytest.raises(DataError, match="bad.jsonl"):
        plan_recipe(path, [f"data.files=[{bad}]"])


def test_bad_input_gives_the_projects_errors(tmp_path, capsys):
    yaml = ROOT / "configs/qwen3_moe/30b_a3b_vanilla.yaml"
    with pytest.raises(ConfigError, match="has no config.json"):
        plan_recipe(yaml, [f"model.path={tmp_path}"])
    with pytest.raises(ConfigError, match="unknown config key"):
        plan_recipe(yaml, [f"model.path={CONFIGS / 'Qwen3-30B-A3B'}", "condensr.gamma=1"])
    with pytest.raises(ConfigError, match="no config.json could be read"):  # phase 1's output does not exist yet
        plan_recipe(TINY / "qwen3_moe_condenser_phase2.yaml", [f"model.path={tmp_path / 'phase1' / 'final'}"])
    with pytest.raises(ConfigError, match="world-size"):
        plan_recipe(TINY / "qwen3_moe_vanilla.yaml", world_size=0)
    code, _, err = _dry_run(capsys, TINY / "qwen3_moe_vanilla.yaml", "--resume")
    assert code == 2 and "--dry-run trains nothing" in err
    assert main(["train", str(TINY / "qwen3_moe_vanilla.yaml"), "--json"]) == 2
    assert "add --dry-run" in capsys.readouterr().err


def test_method_refused_by_the_launch_is_refused_by_the_dry_run():
    with pytest.raises(ConfigError, match="weight_decay"):
        plan_recipe(TINY / "qwen3_moe_esft_token.yaml", ["training.weight_decay=0.1", "deepspeed=configs/deepspeed/zero2.json"])
