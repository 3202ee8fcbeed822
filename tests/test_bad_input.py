"""The bad-input catalogue: every case runs the real CLI and must end with exit status 2, one
last line `moe-sft VERB: error: ...` naming the offending key, file or value, no traceback,
and nothing new under the test's folder (no output path created, not even a hidden temporary).

To add a case, append a `Case` to CASES. `argv` and `files` may use the placeholders of
`Paths` ({tmp}: the test's folder, also the working directory; {repo}; {stock}: a tiny stock
qwen3_moe checkpoint with tokenizer; {profile}: a `moe-sft profile` folder of it; ...).
`files` are written before the run (relative to {tmp}); `setup(paths)` does anything else;
`subprocess=True` runs `python -m moe_sft.cli` in a child process (the real entry point; use it
for every case with `deepspeed`, whose process group would outlive the case), otherwise
`moe_sft.cli.main(argv)` runs in this process.
"""

from __future__ import annotations

import dataclasses
import json
import os
import re
import subprocess
import sys
from pathlib import Path
from typing import Callable

import pytest
import torch

REPO = Path(__file__).resolve().parents[1]
TINY_TRAIN = "{repo}/configs/tiny/qwen3_moe_vanilla.yaml"
ZERO2 = "deepspeed={repo}/configs/deepspeed/zero2.json"
ARITH = "{repo}/configs/tiny/data/arith.jsonl"
LAUNCHER_ENV = ("RANK", "LOCAL_RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")
ENV = {"OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}


@dataclasses.dataclass(frozen=True)
class Case:
    id: str
    argv: tuple[str, ...]
    match: tuple[str, ...]  # regular expressions the error line must all contain
    files: dict[str, str] = dataclasses.field(default_factory=dict)
    setup: Callable[[dict], None] | None = None
    env: dict[str, str] = dataclasses.field(default_factory=dict)
    subprocess: bool = False


def patch(*extra, config: bool = False) -> tuple[str, ...]:
    cfg = ("--config", "{tmp}/m.yaml") if config else ()
    return ("patch", "--model", "{stock}", "--out", "{tmp}/out", *cfg, *extra)


def train(*overrides) -> tuple[str, ...]:
    return ("train", TINY_TRAIN, "training.output_dir={tmp}/run", *overrides)


def evaluate(*extra) -> tuple[str, ...]:
    return ("eval", "--model", "{stock}", "--out", "{tmp}/ev", *extra)


def prune(*extra, model="{stock}", profile="{profile}") -> tuple[str, ...]:
    return ("prune", "--model", model, "--profile", profile, "--out", "{tmp}/pruned", *extra)


def ablate_yaml(**changes) -> dict[str, str]:
    cfg = {"model": {"tiny": "qwen3_moe", "experts_implementation": "eager"}, "out": "{tmp}/abl", "benchmarks": ["boolq"],
           "scoring": "loglik", "limit": 2, "data_dir": "{tmp}/llm", "profile_data": ARITH, "profile_limit": 8,
           "strategies": ["least_used", "random"], "ratios": [0.25], "seeds": [0], **changes}  # fmt: skip
    return {"ablate.yaml": json.dumps({k: v for k, v in cfg.items() if v is not None}), **BOOLQ}


BOOLQ = {"llm/boolq/test.json": json.dumps([{"instruction": f"Is {i} even? Answer format: true/false", "answer": "true"} for i in range(3)])}
ABLATE = ("ablate", "{tmp}/ablate.yaml")
EVAL_OK = ("--benchmarks", "boolq", "--data", "boolq={tmp}/b.json", "--scoring", "loglik", "--limit", "1")


def _run_eval_once(paths: dict) -> None:
    from moe_sft.cli import main

    assert main([fill(a, paths) for a in evaluate(*EVAL_OK)]) == 0


def _craft_group_profile(paths: dict) -> None:
    """A deepseek_v3 profile whose least-used experts all sit in the first routing group."""
    from moe_sft.pruning import ExpertProfile
    from moe_sft.pruning.profile import write_profile

    p = ExpertProfile.load(paths["dsv3_profile"])
    p.counts = p.counts.new_tensor([list(range(p.num_experts))] * len(p.layers)) * 10
    write_profile(p, Path(paths["tmp"]) / "grouped")


def _damaged_checkpoint(damage: Callable[[Path], None]) -> Callable[[dict], None]:
    """Copy the shared patched checkpoint to {tmp}/pc and damage the copy."""

    def setup(paths: dict) -> None:
        import shutil

        target = Path(paths["tmp"]) / "pc"
        shutil.copytree(paths["patched"], target)
        damage(target)

    return setup


def _truncate(path: Path) -> None:
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])


CASES: list[Case] = [
    # ---- patch -------------------------------------------------------------------------------
    Case("patch-unknown-key", patch(config=True), (r"condensr",), {"m.yaml": "condensr: {}\n"}),
    Case("patch-ill-typed", patch(config=True), (r"track_usage", r"maybe"), {"m.yaml": "track_usage: maybe\n"}),
    Case("patch-bad-override", patch("routing.disabled_experts=[1]"), (r"routing\.disabled_experts", r"\[1\]")),
    Case("patch-override-not-key-value", patch("condenser"), (r"'condenser'", r"key=value")),
    Case("patch-config-missing", ("patch", "--model", "{stock}", "--out", "{tmp}/out", "--config", "{tmp}/nope.yaml"), (r"nope\.yaml",)),
    Case("patch-yaml-syntax", patch(config=True), (r"m\.yaml", r"line 2"), {"m.yaml": "track_usage: true\nrouting: [1, 2\n"}),
    Case("patch-out-not-empty", patch(), (r"--out", r"out'"), {"out/keep.txt": "mine"}),
    Case("patch-bad-dtype", patch("--dtype", "float33"), (r"--dtype", r"float33")),
    Case("patch-condensers-not-below-top-k", patch(config=True), (r"num", r"4", r"top_k"),
         {"m.yaml": "condenser: {condensers: {num: 4}}\n"}),  # fmt: skip
    Case("patch-lora-with-esft", patch(config=True), (r"lora", r"esft"),
         {"m.yaml": "lora: {}\nesft: {selection_file: sel.json}\n", "sel.json": json.dumps({"experts": {"0": [1]}})}),  # fmt: skip
    Case("patch-moe-bias-env", patch(config=True), (r"MOE_BIAS_TOP_K", r"abc"), {"m.yaml": "moe_bias_head: {}\n"},
         env={"MOE_BIAS_TOP_K": "abc"}),  # fmt: skip
    Case("patch-unsupported-family", ("patch", "--model", "{llama}", "--out", "{tmp}/out"), (r"Llama", r"qwen3_moe")),
    # ---- train -------------------------------------------------------------------------------
    Case("train-unknown-tiny-model-type", train("model.tiny=foo_moe"), (r"model\.tiny", r"foo_moe", r"qwen3_moe"), subprocess=True),
    Case("train-unknown-top-level-key", train("modle.tiny=qwen3_moe"), (r"modle",)),
    Case("train-unknown-training-key", train("training.learnin_rate=1e-3"), (r"training\.learnin_rate",)),
    Case("train-reserved-training-key", train("training.deepspeed=z.json"), (r"training\.deepspeed",)),
    Case("train-ill-typed-training-value", train("training.max_steps=ten"), (r"training\.max_steps", r"ten")),
    Case("train-yaml-no-as-boolean", train("training.save_strategy=no"), (r"training\.save_strategy", r"quote")),
    Case("train-path-and-tiny", train("model.path={tmp}/m"), (r"model", r"exactly one of")),
    Case("train-bad-dtype", train("model.dtype=fp33"), (r"model\.dtype", r"fp33")),
    Case("train-no-output-dir", ("train", TINY_TRAIN, "training.output_dir=null"), (r"training\.output_dir",)),
    Case("train-config-missing", ("train", "{tmp}/nope.yaml"), (r"nope\.yaml",)),
    Case("train-deepspeed-file-missing", train("deepspeed={tmp}/nope.json"), (r"deepspeed", r"nope\.json")),
    Case("train-deepspeed-bad-json", train("deepspeed={tmp}/ds.json"), (r"ds\.json", r"line 1"), {"ds.json": "{zero: 2"}),
    Case("train-deepspeed-not-a-path", train("deepspeed=3"), (r"deepspeed", r"3")),
    Case("train-deepspeed-incomplete-launcher-env", train(ZERO2), (r"deepspeed", r"MASTER_ADDR", r"torchrun"),
         env={"RANK": "0"}, subprocess=True),  # fmt: skip
    pytest.param(Case("train-bf16-on-cpu", train(ZERO2, "training.bf16=true"), (r"training\.bf16",), subprocess=True),
                 marks=pytest.mark.skipif(torch.cuda.is_available(), reason="bf16 is refused on CPU only")),  # fmt: skip
    Case("train-esft-deepspeed-weight-decay", ("train", "{repo}/configs/tiny/qwen3_moe_esft_token.yaml",
         "training.output_dir={tmp}/run", ZERO2, "training.weight_decay=0.1"), (r"weight_decay", r"0\.1"), subprocess=True),  # fmt: skip
    Case("train-data-file-missing", train("data.files=[{tmp}/none.jsonl]"), (r"none\.jsonl",)),
    Case("train-malformed-record", train("data.files=[{tmp}/bad.jsonl]"), (r"bad\.jsonl", r"line 2"),
         {"bad.jsonl": '{"instruction": "1+1", "output": "2"}\n{"instruction": 5\n'}),  # fmt: skip
    Case("train-then-cycle", ("train", "{tmp}/a.yaml", "training.output_dir={tmp}/run"), (r"then", r"cycle"),
         {"a.yaml": "model: {tiny: qwen3_moe}\ndata: {files: [" + ARITH + "]}\ntraining: {output_dir: x}\nthen: a.yaml\n"}),  # fmt: skip
    Case("train-resume-without-checkpoint", (*train(), "--resume"), (r"--resume", r"checkpoint", r"run")),
    Case("train-resume-only-cut-checkpoints", (*train(), "--resume"), (r"--resume", r"complete", r"checkpoint-4"),
         {"run/checkpoint-4/model.safetensors": "cut"}),  # fmt: skip
    Case("train-resume-cut-checkpoint-named", (*train(), "--resume={tmp}/run/checkpoint-4"), (r"checkpoint-4", r"trainer_state\.json"),
         {"run/checkpoint-4/model.safetensors": "cut"}),  # fmt: skip
    Case("train-output-dir-holds-a-run", train(), (r"output_dir", r"checkpoint-4", r"--resume", r"--overwrite"),
         {"run/checkpoint-4/trainer_state.json": "{}"}),  # fmt: skip
    Case("train-esft-selection-file-missing", ("train", "{repo}/configs/tiny/qwen3_moe_esft_token.yaml", "training.output_dir={tmp}/run",
         "esft.selection_file={tmp}/nope.json"), (r"esft\.selection_file", r"nope\.json")),  # fmt: skip
    # ---- eval --------------------------------------------------------------------------------
    Case("eval-unknown-benchmark", evaluate("--benchmarks", "gsm9k"), (r"gsm9k",)),
    Case("eval-hellaswag-without-data", evaluate("--benchmarks", "hellaswag", "--data-dir", "{tmp}/llm"), (r"hellaswag",), BOOLQ),
    Case("eval-data-not-a-list", evaluate(*EVAL_OK), (r"b\.json",), {"b.json": '{"instruction": "x"}'}),
    Case("eval-record-without-answer", evaluate(*EVAL_OK), (r"b\.json", r"answer"), {"b.json": '[{"instruction": "x"}]'}),
    Case("eval-bad-gold", evaluate("--benchmarks", "gsm8k", "--data", "gsm8k={tmp}/g.json"), (r"g\.json", r"abc"),
         {"g.json": '[{"instruction": "1+1?", "answer": "abc"}]'}),  # fmt: skip
    Case("eval-data-named-twice", evaluate("--data", "boolq={tmp}/a.json", "--data", "boolq={tmp}/b.json"), (r"twice", r"boolq")),
    Case("eval-data-without-name", evaluate("--data", "boolq"), (r"--data", r"NAME=")),
    Case("eval-limit-not-a-number", evaluate("--limit", "ten"), (r"--limit", r"ten")),
    Case("eval-patched-checkpoint-without-weights", ("eval", "--model", "{tmp}/pc", "--out", "{tmp}/ev", *EVAL_OK),
         (r"pc", r"model\*\.safetensors"), {"b.json": BOOLQ["llm/boolq/test.json"]},
         setup=_damaged_checkpoint(lambda d: (d / "model.safetensors").unlink())),  # fmt: skip
    Case("eval-truncated-moe-sft-tensors", ("eval", "--model", "{tmp}/pc", "--out", "{tmp}/ev", *EVAL_OK),
         (r"moe_sft_tensors\.safetensors", r"damaged"), {"b.json": BOOLQ["llm/boolq/test.json"]},
         setup=_damaged_checkpoint(lambda d: _truncate(d / "moe_sft_tensors.safetensors"))),  # fmt: skip
    Case("eval-other-settings-into-same-out", evaluate(*EVAL_OK[:2], "--data", "boolq={tmp}/b2.json", *EVAL_OK[4:]),
         (r"ev", r"b2\.json"), {"b.json": BOOLQ["llm/boolq/test.json"], "b2.json": BOOLQ["llm/boolq/test.json"]},
         setup=_run_eval_once),  # fmt: skip
    # ---- profile -----------------------------------------------------------------------------
    Case("profile-out-not-empty", ("profile", "--model", "{stock}", "--data", ARITH, "--out", "{tmp}/p"), (r"--out", r"p'"),
         {"p/keep.txt": "mine"}),  # fmt: skip
    Case("profile-limit-zero", ("profile", "--model", "{stock}", "--data", ARITH, "--limit", "0", "--out", "{tmp}/p"), (r"--limit", r"0")),
    Case("profile-data-missing", ("profile", "--model", "{stock}", "--data", "{tmp}/none.jsonl", "--out", "{tmp}/p"), (r"none\.jsonl",)),
    # ---- prune -------------------------------------------------------------------------------
    Case("prune-ratio-rounds-to-zero", prune("--strategy", "least_used", "--ratio", "0.01"), (r"ratio=0\.01", r"rounds to 0")),
    Case("prune-leaves-fewer-than-top-k", prune("--strategy", "least_used", "--ratio", "0.75"), (r"top_k=4", r"leaves 2")),
    Case("prune-super-experts-with-ratio", prune("--strategy", "super_experts", "--ratio", "0.25"), (r"super_experts", r"ratio")),
    Case("prune-without-count", prune("--strategy", "most_used"), (r"ratio", r"num")),
    Case("prune-unknown-strategy", prune("--strategy", "biggest"), (r"--strategy", r"biggest")),
    Case("prune-profile-missing", prune("--strategy", "least_used", "--ratio", "0.25", profile="{tmp}/noprof"), (r"profile\.json", r"noprof")),
    Case("prune-profile-of-another-model", prune("--strategy", "least_used", "--ratio", "0.25", model="{olmoe}"), (r"profile", r"olmoe")),
    Case("prune-remove-uneven-groups", prune("--strategy", "least_used", "--num", "2", "--mode", "remove", model="{dsv3}",
         profile="{tmp}/grouped"), (r"group", r"--mode mask"), setup=_craft_group_profile),  # fmt: skip
    Case("prune-out-not-empty", prune("--strategy", "least_used", "--ratio", "0.25"), (r"--out", r"pruned'"), {"pruned/keep": "x"}),
    # ---- ablate ------------------------------------------------------------------------------
    Case("ablate-ratio-leaves-fewer-than-top-k", (*ABLATE, "ratios=[0.75]"), (r"r0\.75", r"top_k=4"), ablate_yaml()),
    Case("ablate-ratio-refused-before-loading", (*ABLATE, "ratios=[0.75]"), (r"r0\.75", r"top_k=4"),
         ablate_yaml(profile="{profile}", profile_data=None, model={"path": "{tmp}/no-model"})),  # fmt: skip
    Case("ablate-unknown-key", (*ABLATE, "colour=red"), (r"colour",), ablate_yaml()),
    Case("ablate-ratio-out-of-range", (*ABLATE, "ratios=[1.5]"), (r"ratios", r"1\.5"), ablate_yaml()),
    Case("ablate-unknown-strategy", (*ABLATE, "strategies=[biggest]"), (r"strategies", r"biggest"), ablate_yaml()),
    Case("ablate-random-without-seeds", (*ABLATE, "seeds=[]"), (r"random", r"seeds"), ablate_yaml()),
    Case("ablate-profile-and-profile-data", (*ABLATE, "profile={profile}"), (r"profile_data", r"exactly one"), ablate_yaml()),
    Case("ablate-unknown-tiny-model-type", (*ABLATE, "model.tiny=foo_moe"), (r"model\.tiny", r"foo_moe"), ablate_yaml()),
    Case("ablate-other-settings-in-out", ABLATE, (r"abl", r"other settings"),
         {**ablate_yaml(profile="{profile}", profile_data=None), "abl/settings.json": '{"model": "another"}'}),  # fmt: skip
    Case("ablate-config-missing", ("ablate", "{tmp}/nope.yaml"), (r"nope\.yaml",)),
    # ---- demo --------------------------------------------------------------------------------
    Case("demo-out-not-a-demo", ("demo", "--out", "{tmp}/d"), (r"d exists", r"demo"), {"d/mine.txt": "x"}),
    Case("demo-no-fine-tuning-seeds", ("demo", "--out", "{tmp}/d", "--seeds", "0"), (r"--seeds 0", r"at least 1")),
    Case("demo-no-grpo-seeds", ("demo", "--out", "{tmp}/d", "--rl-seeds", "0"), (r"--rl-seeds 0", r"at least 1")),
]


# ---- the runner ------------------------------------------------------------------------------
@pytest.fixture(scope="session")
def paths(tmp_path_factory) -> dict:
    """Inputs shared by the cases, built once (lazily, by name) outside every case's folder."""
    return _Inputs(tmp_path_factory.mktemp("inputs"))


class _Inputs(dict):
    def __init__(self, root: Path):
        super().__init__(repo=str(REPO))
        self.root = root

    def __missing__(self, key: str) -> str:
        value = str(getattr(self, f"_{key}")())
        self[key] = value
        return value

    def _save(self, name: str, model_type: str) -> Path:
        from moe_sft.testing import tiny_model, tiny_tokenizer

        path = self.root / name
        tiny_model(model_type).save_pretrained(path)
        tiny_tokenizer().save_pretrained(path)
        return path

    def _stock(self):
        return self._save("stock", "qwen3_moe")

    def _patched(self):
        from moe_sft.cli import main

        (self.root / "bias.yaml").write_text("condenser: {bias: {gamma: 0.01}}\n")
        out = self.root / "patched"
        assert main(["patch", "--model", self["stock"], "--config", str(self.root / "bias.yaml"), "--out", str(out)]) == 0
        return out

    def _olmoe(self):
        return self._save("olmoe", "olmoe")

    def _dsv3(self):
        return self._save("dsv3", "deepseek_v3")

    def _llama(self):
        from transformers import LlamaConfig, LlamaForCausalLM

        cfg = LlamaConfig(vocab_size=64, hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2)
        LlamaForCausalLM(cfg).save_pretrained(self.root / "llama")
        return self.root / "llama"

    def _make_profile(self, model: str, name: str) -> Path:
        from moe_sft.cli import main

        out = self.root / name
        assert main(["profile", "--model", model, "--data", fill(ARITH, self), "--limit", "8", "--out", str(out)]) == 0
        return out

    def _profile(self):
        return self._make_profile(self["stock"], "profile")

    def _dsv3_profile(self):
        return self._make_profile(self["dsv3"], "dsv3_profile")


def fill(text, paths):
    """Replace {name} placeholders (built on first use)."""
    return re.sub(r"\{(\w+)\}", lambda m: paths[m[1]], text)


def _snapshot(root: Path) -> dict[str, float]:
    return {str(p.relative_to(root)): p.stat().st_mtime for p in root.rglob("*")}


def _run(case: Case, argv: list[str], cwd: Path, capsys) -> tuple[int, str]:
    if case.subprocess:
        env = {k: v for k, v in os.environ.items() if k not in LAUNCHER_ENV} | ENV | case.env
        proc = subprocess.run([sys.executable, "-m", "moe_sft.cli", *argv], cwd=cwd, env=env, capture_output=True, text=True,
                              timeout=300)  # fmt: skip
        return proc.returncode, proc.stderr
    from moe_sft.cli import main

    saved = dict(os.environ)
    os.environ.update(case.env)
    for key in set(LAUNCHER_ENV) - set(case.env):
        os.environ.pop(key, None)
    capsys.readouterr()
    try:
        code = main(argv)
    except SystemExit as e:  # argparse
        code = e.code
    finally:
        os.environ.clear()
        os.environ.update(saved)
    return code, capsys.readouterr().err


def _ids(case) -> str:
    return (case.values[0] if hasattr(case, "values") else case).id


@pytest.mark.parametrize("case", CASES, ids=_ids)
def test_bad_input_exits_2_naming_it_and_writes_nothing(case: Case, paths, tmp_path, monkeypatch, capsys):
    local = _Local(paths, tmp_path)
    for rel, text in case.files.items():
        (tmp_path / rel).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / rel).write_text(fill(text, local))
    if case.setup is not None:
        case.setup(local)
    argv = [fill(a, local) for a in case.argv]
    monkeypatch.chdir(tmp_path)
    before = _snapshot(tmp_path)

    code, err = _run(case, argv, tmp_path, capsys)

    assert "Traceback" not in err, err
    assert code == 2, err
    last = err.strip().splitlines()[-1]
    assert last.startswith(f"moe-sft {argv[0]}: error: "), err
    for pattern in case.match:
        assert re.search(pattern, last), f"{pattern!r} not in {last!r}"
    assert _snapshot(tmp_path) == before, "the failed command created or changed files"


class _Local(dict):
    """The shared inputs plus this case's {tmp}."""

    def __init__(self, shared: _Inputs, tmp: Path):
        super().__init__(tmp=str(tmp))
        self.shared = shared

    def __missing__(self, key: str) -> str:
        return self.shared[key]
