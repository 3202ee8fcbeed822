"""moe_sft inside any Hugging Face trainer: the same run through `moe-sft train`, a plain
`transformers.Trainer` with `MoESFTCallback` and TRL's `SFTTrainer` with it; saving through
`trainer.save_model`; the warning when the callback is missing; the aux-loss setting.

Tolerances: `moe-sft train` and the plain Trainer run the same code and must agree exactly.
TRL computes the loss from per-token log-probabilities (its fused LM head, answered by the
MoE-Bias head from the full logits), the plain Trainer with F.cross_entropy; both are fp32,
so losses agree to rtol 1e-5 and weights to atol 1e-5 after two SGD steps.
"""

import dataclasses
import warnings
from pathlib import Path

import pytest
import torch
import yaml
from transformers import AutoModelForCausalLM, Trainer, TrainerCallback, TrainingArguments

import moe_sft
from moe_sft import MoESFTCallback, MoESFTConfig
from moe_sft.methods.condenser import router_bias
from moe_sft.methods.esft import save_selection
from moe_sft.testing import tiny_batch, tiny_model, tiny_tokenizer
from moe_sft.train import load_train_config, train
from moe_sft.train.config import DataConfig
from moe_sft.train.data import SFTCollator, build_dataset

ROOT = Path(__file__).resolve().parents[1]
DATA = ROOT / "configs/tiny/data/arith.jsonl"
TRAINING = dict(
    per_device_train_batch_size=4,
    gradient_accumulation_steps=2,
    max_steps=2,
    learning_rate=0.1,
    # SGD: Adam's first steps are ~lr * sign(grad), so float rounding of a near-zero gradient
    # could flip a weight's step; SGD keeps the trainers' differences at the gradients' rounding.
    optim="sgd",
    lr_scheduler_type="constant",
    logging_steps=1,
    save_strategy="no",
    report_to="none",
    seed=0,
    data_seed=0,  # the sampler's own generator: TRL's __init__ draws from the global one
    disable_tqdm=True,
    use_cpu=True,
    bf16=False,  # TRL's SFTConfig defaults to bf16 and activation checkpointing; HF's to neither
    gradient_checkpointing=False,
)
LOSS_RTOL, WEIGHT_ATOL = 1e-5, 1e-5


def _blocks(method: str, tmp_path: Path) -> dict:
    if method == "condenser":  # bias + long-tail condensers (phase-2 shape, experts listed)
        return {"condenser": {"bias": {"gamma": 0.01}, "condensers": {"num": 1, "experts": {0: [6], 1: [7]}}}}
    # TRL divides the router aux loss by the accumulation steps, the model's own forward adds it
    # per micro-batch: the comparison runs without it (the coefficient is tested on its own).
    if method.startswith("moe_bias_head"):  # adapter mode: only the head trains
        # With accumulation, TRL weights the head's load-balance term by each micro-batch's share
        # of the tokens (as it does the router aux loss), the plain Trainer adds it per micro-batch:
        # with two micro-batches the comparison runs without it, in one micro-batch with it.
        lb = 0.01 if method == "moe_bias_head_lb" else 0.0
        return {"moe_bias_head": {"num_experts": 4, "top_k": 2, "freeze_base": True, "load_balance_weight": lb},
                "router_aux_loss_coef": 0.0}  # fmt: skip
    probe = moe_sft.patch_model(tiny_model("qwen3_moe"))
    path = tmp_path / "selection.json"
    save_selection(path, {m.layer_idx: [1, 4] for m in probe.layers})
    return {"esft": {"selection_file": str(path)}, "router_aux_loss_coef": 0.0}


def _dataset(tokenizer):
    return build_dataset(tokenizer, DataConfig(files=[str(DATA)], max_samples=32, max_length=256))


class _Losses(TrainerCallback):
    def __init__(self):
        self.losses = []

    def on_log(self, args, state, control, logs=None, **kwargs):
        if "loss" in logs:
            self.losses.append(logs["loss"])


def _via_moe_sft_train(blocks: dict, out: Path) -> tuple[Path, list[float]]:
    recipe = {"model": {"tiny": "qwen3_moe"}, "data": {"files": [str(DATA)], "max_samples": 32, "max_length": 256},
              "training": {"output_dir": str(out), **TRAINING}, **blocks}  # fmt: skip
    path = out.parent / f"{out.name}.yaml"
    path.write_text(yaml.safe_dump(recipe))
    losses = _Losses()
    final = train(load_train_config(path), callbacks=(losses,))
    return final, losses.losses


def _patched(blocks: dict):
    model = tiny_model("qwen3_moe")
    handle = moe_sft.patch_model(model, MoESFTConfig.from_dict(blocks))
    return model, handle


class _HeadAux(TrainerCallback):
    """The MoE-Bias head's raw load-balance loss of every micro-batch, summed per step."""

    def __init__(self, model):
        self.model, self.steps, self.current = model, [], 0.0

    def on_substep_end(self, args, state, control, **kwargs):
        self.current += float(self.model.moe_bias_head.last_aux_loss.detach())

    def on_step_end(self, args, state, control, **kwargs):
        self.steps.append(self.current + float(self.model.moe_bias_head.last_aux_loss.detach()))
        self.current = 0.0


def _via_trainer(blocks: dict, out: Path, trl: bool):
    tokenizer = tiny_tokenizer()
    model, handle = _patched(blocks)
    model.config.use_cache = False
    dataset = _dataset(tokenizer)
    callbacks = [MoESFTCallback()] + ([_HeadAux(model)] if "moe_bias_head" in blocks else [])
    if trl:
        import datasets
        from trl import SFTConfig, SFTTrainer

        rows = [{"input_ids": r["input_ids"], "labels": r["labels"]} for r in dataset.rows]  # TRL keeps given labels
        trainer = SFTTrainer(model=model, args=SFTConfig(output_dir=str(out), max_length=None, **TRAINING),
                             train_dataset=datasets.Dataset.from_list(rows), processing_class=tokenizer,
                             callbacks=callbacks)  # fmt: skip
    else:
        trainer = Trainer(model=model, args=TrainingArguments(output_dir=str(out), **TRAINING), train_dataset=dataset,
                          data_collator=SFTCollator(tokenizer.pad_token_id), callbacks=callbacks)  # fmt: skip
    trainer.train()
    return trainer, model, handle


def _losses(trainer) -> list[float]:
    return [h["loss"] for h in trainer.state.log_history if "loss" in h]


@pytest.mark.parametrize("method", ["condenser", "moe_bias_head", "moe_bias_head_lb", "esft"])
def test_same_run_through_moe_sft_train_plain_trainer_and_trl(method, tmp_path, monkeypatch):
    if method == "moe_bias_head_lb":
        monkeypatch.setitem(TRAINING, "gradient_accumulation_steps", 1)
    blocks = _blocks(method, tmp_path)
    final, cli_losses = _via_moe_sft_train(blocks, tmp_path / "cli")
    cli_state = moe_sft.from_pretrained(final).state_dict()

    plain, plain_model, plain_handle = _via_trainer(blocks, tmp_path / "plain", trl=False)
    tuned, trl_model, trl_handle = _via_trainer(blocks, tmp_path / "trl", trl=True)
    start, _ = _patched(blocks)

    losses = _losses(plain)
    assert len(losses) == 2 and cli_losses == losses
    trl_losses = torch.tensor(_losses(tuned))
    if method.startswith("moe_bias_head"):
        # TRL logs its loss from the log-probs (true log-probabilities: the head's load-balance
        # term enters their gradient only); the plain Trainer's loss adds w * aux per micro-batch.
        aux = next(cb for cb in tuned.callback_handler.callbacks if isinstance(cb, _HeadAux)).steps
        trl_losses = trl_losses + blocks["moe_bias_head"]["load_balance_weight"] * torch.tensor(aux)
    torch.testing.assert_close(trl_losses, torch.tensor(losses), rtol=LOSS_RTOL, atol=0)
    plain_state, trl_state, start_state = plain_model.state_dict(), trl_model.state_dict(), start.state_dict()
    moved = [k for k in plain_state if not torch.equal(plain_state[k], start_state[k])]
    assert moved  # something trained
    for k, v in plain_state.items():
        assert torch.equal(cli_state[k], v), k  # moe-sft train == plain Trainer, exactly
        torch.testing.assert_close(trl_state[k], v, atol=WEIGHT_ATOL, rtol=0, msg=k)
    if method == "condenser":
        for k, b in router_bias(plain_handle).items():
            assert b.abs().sum() > 0
            assert torch.equal(router_bias(trl_handle)[k], b)  # two updates of +-gamma: exactly equal
    if method.startswith("moe_bias_head"):
        assert {k.split(".")[0] for k in moved} == {"moe_bias_head"}  # adapter mode: only the head
        for model in (plain_model, trl_model):
            assert model.moe_bias_head.bias.abs().sum() > 0  # the head trains under TRL too
    if method == "esft":
        frozen = [e for e in range(8) if e not in (1, 4)]
        for m in plain_handle.layers:
            key = f"{m.name}.experts.gate_up_proj"
            assert torch.equal(plain_state[key][frozen], start_state[key][frozen])
            assert not torch.equal(plain_state[key][[1, 4]], start_state[key][[1, 4]])


def test_trl_with_condenser_keeps_the_aux_loss_off(tmp_path):
    tuned, model, handle = _via_trainer(_blocks("condenser", tmp_path), tmp_path / "trl", trl=True)
    assert tuned.aux_loss_enabled is False and model.config.router_aux_loss_coef == 0.0
    with pytest.raises(moe_sft.ConfigError, match="auxiliary-loss free"):
        from trl import SFTConfig, SFTTrainer

        SFTTrainer(model=model, args=SFTConfig(output_dir=str(tmp_path / "x"), router_aux_loss_coef=0.01, **TRAINING),
                   train_dataset=tuned.train_dataset, processing_class=tuned.processing_class,
                   callbacks=[MoESFTCallback()])  # fmt: skip


# --------------------------------------------------------------------------- saving through every door
SAVE_CASES = {
    "condenser_longtail": {"condenser": {"bias": {"gamma": 0.01}, "condensers": {"num": 1, "experts": {0: [6], 1: [7]}}}},
    "condenser_new": {"condenser": {"bias": {"gamma": 0.01}, "condensers": {"source": "new", "num": 2, "experts": {0: [5, 6, 7], 1: [5, 6, 7]}}}},
    "densemixer": {"densemixer": {}},
    "frozen_router": {"frozen_router": {}},
    "moe_bias_head": {"moe_bias_head": {"num_experts": 4, "top_k": 2}},
    "disabled_experts": {"routing": {"disabled_experts": {0: [3]}}, "router_aux_loss_coef": 0.02},
}


@pytest.mark.parametrize("case", sorted(SAVE_CASES))
def test_trainer_save_model_is_a_complete_patched_checkpoint(case, tmp_path):
    blocks = SAVE_CASES[case]
    trainer, model, handle = _via_trainer(blocks, tmp_path / "run", trl=False)
    trainer.save_model(str(tmp_path / "saved"))
    restored = moe_sft.from_pretrained(tmp_path / "saved")
    restored_handle = moe_sft.get_handle(restored)
    assert restored_handle.config == handle.config
    extra = handle.extra_state_dict()
    assert extra.keys() == restored_handle.extra_state_dict().keys()
    for k, v in extra.items():
        assert torch.equal(restored_handle.extra_state_dict()[k], v), k
    batch = tiny_batch(model, seed=3)
    model.eval(), restored.eval()
    with torch.no_grad():
        assert torch.equal(restored(**batch).logits, model(**batch).logits)
    # Stock transformers reads the same folder as the stock model, with no stray keys and
    # the config.json values the model was loaded with.
    stock, info = AutoModelForCausalLM.from_pretrained(tmp_path / "saved", output_loading_info=True)
    assert not info["unexpected_keys"] and not info["missing_keys"], info
    assert stock.config.router_aux_loss_coef == tiny_model("qwen3_moe").config.router_aux_loss_coef


def test_lora_through_save_model_restores_with_load_adapter(tmp_path):
    from moe_sft.methods.lora import get_peft_model, load_adapter

    model, handle = _patched({"lora": {"r": 4}, "condenser": {"bias": {"gamma": 0.01}}})
    peft_model = get_peft_model(model)
    tokenizer = tiny_tokenizer()
    trainer = Trainer(model=peft_model, args=TrainingArguments(output_dir=str(tmp_path / "run"), **TRAINING),
                      train_dataset=_dataset(tokenizer), data_collator=SFTCollator(tokenizer.pad_token_id),
                      callbacks=[MoESFTCallback()])  # fmt: skip
    trainer.train()
    trainer.save_model(str(tmp_path / "saved"))
    restored = load_adapter(tiny_model("qwen3_moe"), tmp_path / "saved")
    batch = tiny_batch(model, seed=3)
    peft_model.eval(), restored.eval()
    with torch.no_grad():
        assert torch.equal(restored(**batch).logits, peft_model(**batch).logits)
    biases = router_bias(moe_sft.find_handle(restored))
    for k, b in router_bias(handle).items():
        assert b.abs().sum() > 0 and torch.equal(biases[k], b)


# --------------------------------------------------------------------------- missing callback
def test_training_without_the_callback_warns_once(tmp_path):
    model, handle = _patched(_blocks("condenser", tmp_path))
    tokenizer = tiny_tokenizer()
    args = TrainingArguments(output_dir=str(tmp_path / "run"), **{**TRAINING, "max_steps": 3})
    trainer = Trainer(model=model, args=args, train_dataset=_dataset(tokenizer), data_collator=SFTCollator(tokenizer.pad_token_id))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        trainer.train()
    ours = [w for w in caught if "moe_sft.MoESFTCallback" in str(w.message)]
    assert len(ours) == 1 and "condenser" in str(ours[0].message)
    assert all(b.abs().sum() == 0 for b in router_bias(handle).values())  # what the warning is about

    # with the callback, or with moe_sft.step in a loop of one's own: no warning
    model, handle = _patched(_blocks("condenser", tmp_path))
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    model.train()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        for step in range(3):
            model(**tiny_batch(model, seed=step)).loss.backward()
            opt.step()
            opt.zero_grad()
            moe_sft.step(model)
    assert not [w for w in caught if "MoESFTCallback" in str(w.message)]
    assert all(b.abs().sum() > 0 for b in router_bias(handle).values())


# --------------------------------------------------------------------------- aux loss
def _first_logged_loss(blocks: dict, tmp_path: Path, trl: bool = False) -> tuple[float, torch.Tensor, torch.Tensor]:
    """(first logged loss, CE of the same first batch, its aux loss) computed by hand on the
    model before the step."""
    args = {**TRAINING, "gradient_accumulation_steps": 1, "max_steps": 1}
    tokenizer = tiny_tokenizer()
    model, handle = _patched(blocks)
    dataset = _dataset(tokenizer)
    trainer = Trainer(model=model, args=TrainingArguments(output_dir=str(tmp_path / "ref"), **args), train_dataset=dataset,
                      data_collator=SFTCollator(tokenizer.pad_token_id))  # fmt: skip
    batch = next(iter(trainer.get_train_dataloader()))
    with torch.no_grad():
        out = model(**{k: v for k, v in batch.items() if k != "labels"}, output_router_logits=True)
    logits = out.logits[:, :-1].reshape(-1, out.logits.shape[-1])
    ce = torch.nn.functional.cross_entropy(logits, batch["labels"][:, 1:].reshape(-1), ignore_index=-100)
    if trl:
        import datasets
        from trl import SFTConfig, SFTTrainer

        rows = [{"input_ids": r["input_ids"], "labels": r["labels"]} for r in dataset.rows]  # TRL keeps given labels
        trainer = SFTTrainer(model=model, args=SFTConfig(output_dir=str(tmp_path / "trl"), max_length=None, **args),
                             train_dataset=datasets.Dataset.from_list(rows), processing_class=tokenizer,
                             callbacks=[MoESFTCallback()])  # fmt: skip
    else:
        trainer = Trainer(model=model, args=TrainingArguments(output_dir=str(tmp_path / "run"), **args), train_dataset=dataset,
                          data_collator=SFTCollator(tokenizer.pad_token_id), callbacks=[MoESFTCallback()])  # fmt: skip
    trainer.train()
    return _losses(trainer)[0], ce, out.aux_loss


def test_aux_loss_coefficient_is_applied(tmp_path):
    logged, ce, aux = _first_logged_loss({"router_aux_loss_coef": 0.05}, tmp_path)
    assert aux > 0
    assert logged == pytest.approx(float(ce + 0.05 * aux), rel=1e-4)  # the log rounds to 4 significant digits
    assert logged != pytest.approx(float(ce), rel=1e-4)


@pytest.mark.parametrize("trl", [False, True], ids=["plain", "trl"])
def test_condenser_trains_on_the_task_loss_alone(trl, tmp_path):
    logged, ce, aux = _first_logged_loss({"condenser": {"bias": {"gamma": 0.01}}}, tmp_path, trl=trl)
    assert aux > 0  # the tiny config computes an aux loss; the condenser's coefficient 0 drops it
    assert logged == pytest.approx(float(ce), rel=1e-4)


def test_aux_settings_are_validated_and_resolved():
    model = tiny_model("qwen3_moe", output_router_logits=False, router_aux_loss_coef=0.001)
    handle = moe_sft.patch_model(model, MoESFTConfig(router_aux_loss_coef=0.01))
    assert (handle.config.router_aux_loss_coef, handle.config.output_router_logits) == (0.01, True)
    assert (model.config.router_aux_loss_coef, model.router_aux_loss_coef, model.config.output_router_logits) == (0.01, 0.01, True)
    handle.revert()
    assert (model.config.router_aux_loss_coef, model.router_aux_loss_coef, model.config.output_router_logits) == (0.001, 0.001, False)
    handle = moe_sft.patch_model(model)  # unset: the checkpoint's own values, written down
    assert (handle.config.router_aux_loss_coef, handle.config.output_router_logits) == (0.001, False)
    handle.revert()
    with pytest.raises(moe_sft.ConfigError, match="auxiliary-loss free"):
        moe_sft.patch_model(model, MoESFTConfig.from_dict({"router_aux_loss_coef": 0.01, "condenser": {}}))
    with pytest.raises(moe_sft.ConfigError, match="add no load-balancing aux loss"):
        moe_sft.patch_model(tiny_model("deepseek_v3"), MoESFTConfig(router_aux_loss_coef=0.01))
    with pytest.raises(moe_sft.ConfigError, match="router_aux_loss_coef = -1"):
        MoESFTConfig(router_aux_loss_coef=-1.0)


# --------------------------------------------------------------------------- combinations
def test_combinations_are_refused_at_patch_time_naming_both_blocks():
    model = tiny_model("qwen3_moe")
    longtail = {"bias": {"gamma": 0.01}, "condensers": {"num": 2, "experts": {0: [0, 1], 1: [2, 3]}}}
    with pytest.raises(moe_sft.ConfigError, match=r"densemixer and condenser\.condensers"):
        moe_sft.patch_model(model, MoESFTConfig.from_dict({"densemixer": {}, "condenser": longtail}))
    # additive: k = 4 routed + r = 2 condensers need 6 usable experts; disabling 3 of 8 leaves 5
    additive = {"bias": {"gamma": 0.01}, "condensers": {"num": 2, "budget": "additive", "experts": {0: [0, 1], 1: [0, 1]}}}
    disabled = {"disabled_experts": {0: [5, 6, 7]}}
    with pytest.raises(moe_sft.ConfigError, match=r"routing\.disabled_experts.*condenser\.condensers"):
        moe_sft.patch_model(model, MoESFTConfig.from_dict({"routing": disabled, "condenser": additive}))
    assert moe_sft.get_handle(model) is None
    # two disabled still leave 4 routed picks among the 6 neither disabled nor condensers
    handle = moe_sft.patch_model(model, MoESFTConfig.from_dict({"routing": {"disabled_experts": {0: [6, 7]}}, "condenser": additive}))
    handle.revert()


# --------------------------------------------------------------------------- the core knows no method
CORE = ("adapters", "routing", "moe_forward", "patching", "config", "checkpoint", "plugins", "pretrained", "io", "errors")


def test_core_imports_no_method_module():
    import ast
    import subprocess
    import sys

    pkg = ROOT / "moe_sft"
    for name in CORE:
        tree = ast.parse((pkg / f"{name}.py").read_text())
        for node in ast.walk(tree):
            if isinstance(node, ast.ImportFrom):
                target = "." * node.level + (node.module or "")
                assert "methods" not in target and "integrations" not in target, (name, target)
            elif isinstance(node, ast.Import):
                assert not any("moe_sft.methods" in a.name for a in node.names), name
    code = "import sys\n" + "".join(f"import moe_sft.{n}\n" for n in CORE) + (
        "bad = [m for m in sys.modules if m.startswith(('moe_sft.methods', 'moe_sft.integrations'))]\nprint(bad)\nassert not bad\n"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT)
    assert proc.returncode == 0, proc.stdout + proc.stderr


def test_a_plugin_registration_fills_every_table():
    from moe_sft.plugins import get_method, registered_methods

    cls = moe_sft.config.config_class()
    names = [m.name for m in registered_methods()]
    assert [f.name for f in dataclasses.fields(cls)][-len(names):] == names
    for m in registered_methods():
        assert get_method(m.name) is m
        for export in m.exports:
            assert getattr(moe_sft, export) is not None
    assert moe_sft.CondenserConfig is get_method("condenser").config_class
