"""Patched checkpoints: save -> moe_sft.from_pretrained restores exactly; stock checkpoints load
into patched models fully initialised; broken checkpoints are clear errors."""

import json

import pytest
import torch
from safetensors.torch import load_file, save_file
from transformers import AutoModelForCausalLM

import moe_sft
from moe_sft.checkpoint import TENSORS_NAME
from moe_sft.config import CONFIG_NAME, MoESFTConfig, RoutingConfig
from moe_sft.testing import CORE_FAMILIES, tiny_batch, tiny_model


def _config(model):
    last = model.config.num_hidden_layers - 1
    return MoESFTConfig(routing=RoutingConfig(disabled_experts={last: [1, 2]}))


@pytest.mark.parametrize("family", CORE_FAMILIES)
def test_round_trip_restores_outputs_and_extra_tensors(family, tmp_path):
    model = tiny_model(family)
    handle = moe_sft.patch_model(model, _config(model))
    extra = {k: v.clone() for k, v in handle.extra_state_dict().items()}
    assert extra and all(".moe_sft." in k for k in extra)
    batch = tiny_batch(model)
    ref = model(**batch).logits

    moe_sft.save_pretrained(model, tmp_path / "ckpt")
    saved = json.loads((tmp_path / "ckpt" / CONFIG_NAME).read_text())
    assert saved["routing"]["disabled_experts"] == {str(model.config.num_hidden_layers - 1): [1, 2]}

    loaded = moe_sft.from_pretrained(tmp_path / "ckpt")
    h2 = moe_sft.get_handle(loaded)
    assert h2 is not None and h2.config == handle.config
    got = h2.extra_state_dict()
    assert got.keys() == extra.keys()
    assert all(torch.equal(got[k], extra[k]) for k in extra)
    assert torch.equal(loaded(**batch).logits, ref)
    handle.revert()
    h2.revert()


def test_extra_tensor_values_come_from_the_checkpoint(tmp_path):
    """The loader copies the saved values, not just the config's initial ones."""
    model = tiny_model("qwen3_moe")
    handle = moe_sft.patch_model(model, _config(model))
    ctl = handle.layers[-1].controls
    flipped = ~ctl.disabled.clone()
    flipped[[1, 2]] = True
    flipped[[0, 3, 4, 5]] = False
    ctl.disabled.copy_(flipped)  # not what the config would create
    moe_sft.save_pretrained(model, tmp_path / "ckpt")
    loaded = moe_sft.from_pretrained(tmp_path / "ckpt")
    assert torch.equal(moe_sft.get_handle(loaded).layers[-1].controls.disabled, flipped)


def test_stock_checkpoint_into_patched_model_is_fully_initialised(tmp_path):
    stock = tiny_model("deepseek_v3")
    stock.save_pretrained(tmp_path / "stock")
    cfg = _config(stock)
    model = moe_sft.from_pretrained(tmp_path / "stock", config=cfg)
    handle = moe_sft.get_handle(model)
    # every base tensor equals the saved one; every extra tensor holds its defined initial value
    ref = stock.state_dict()
    for k, v in model.state_dict().items():
        if k in ref:
            assert torch.equal(v, ref[k]), k
    disabled = handle.layers[-1].controls.disabled
    assert disabled.tolist() == [i in (1, 2) for i in range(16)]
    # a stock folder without config loads unpatched
    plain = moe_sft.from_pretrained(tmp_path / "stock")
    assert moe_sft.get_handle(plain) is None


def test_stock_transformers_loads_a_patched_checkpoint(tmp_path):
    model = tiny_model("mixtral")
    handle = moe_sft.patch_model(model)  # methods off: outputs equal stock
    moe_sft.save_pretrained(model, tmp_path / "ckpt")
    plain = AutoModelForCausalLM.from_pretrained(tmp_path / "ckpt")
    batch = tiny_batch(model)
    assert torch.equal(plain(**batch).logits, model(**batch).logits)
    handle.revert()


def test_missing_extra_tensors_are_a_clear_error(tmp_path):
    model = tiny_model("olmoe")
    moe_sft.patch_model(model, _config(model))
    moe_sft.save_pretrained(model, tmp_path / "ckpt")
    file = tmp_path / "ckpt" / TENSORS_NAME
    assert set(load_file(file)) == {"model.layers.1.mlp.moe_sft.disabled"}
    save_file({"unrelated": torch.zeros(1)}, file)
    with pytest.raises(moe_sft.CheckpointError, match=r"lacks 1 tensor.*moe_sft\.disabled"):
        moe_sft.from_pretrained(tmp_path / "ckpt")
    file.unlink()
    with pytest.raises(moe_sft.CheckpointError, match=f"no {TENSORS_NAME}"):
        moe_sft.from_pretrained(tmp_path / "ckpt")


def test_save_refuses_non_empty_folder_and_writes_nothing_half_done(tmp_path):
    model = tiny_model("qwen3_moe")
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("user data")
    with pytest.raises(FileExistsError, match="not empty"):
        moe_sft.save_pretrained(model, out)
    assert [p.name for p in out.iterdir()] == ["keep.txt"]

    class Boom(RuntimeError):
        pass

    def failing_save(*args, **kwargs):
        raise Boom()

    model.save_pretrained = failing_save
    with pytest.raises(Boom):
        moe_sft.save_pretrained(model, tmp_path / "new")
    assert not (tmp_path / "new").exists()
    assert [p.name for p in tmp_path.iterdir()] == ["out"]  # no temporary folder left behind


def test_passing_config_for_a_patched_checkpoint_is_refused(tmp_path):
    model = tiny_model("qwen3_moe")
    moe_sft.patch_model(model)
    moe_sft.save_pretrained(model, tmp_path / "ckpt")
    with pytest.raises(ValueError, match="already holds a moe_sft_config.json"):
        moe_sft.from_pretrained(tmp_path / "ckpt", config=MoESFTConfig())
