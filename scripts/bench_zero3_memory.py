"""Peak host memory (RSS) per rank when loading and when training under ZeRO-3, partitioned
loading (what `moe-sft train` does: TrainingArguments with the DeepSpeed config first, so
transformers loads through `zero.Init`) against loading the whole model first.

    python scripts/bench_zero3_memory.py [--sizes 50,200,500] [--steps 2]

For each model size (a Qwen3-MoE whose parameter count is about the given millions, saved once
as a checkpoint), each world size (1, 2) and each loading path, a `torchrun` job loads the
checkpoint, patches it (condenser router bias) and trains a few steps with the HF Trainer and
MoESFTCallback on CPU (fp32, gloo; SGD, so that 800M parameters on two ranks fit a 24 GiB
machine: AdamW's two fp32 moments would add 8 bytes per parameter, split over the ranks). A sampling thread in every rank reads VmRSS every 5 ms;
reported are the peaks above the rank's RSS right before loading, for the load phase (load +
patch) and for training (from Trainer start to the last step). Target: on the ranks that do
not read the checkpoint (rank 1), the partitioned load peak at world size 2 is <= 0.6x the
world-size-1 load peak of loading the whole model; the reading rank's peak is stated (transformers reads the values on
rank 0 only).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
GIB = 1 << 30

# hidden, layers, experts, moe_intermediate per size in millions (vocab 128, top-4)
SHAPES = {50: (512, 4, 20, 384), 200: (768, 6, 28, 512), 500: (1024, 8, 30, 640), 800: (1024, 8, 50, 640)}


def _rss() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


class Sampler(threading.Thread):
    def __init__(self):
        super().__init__(daemon=True)
        self.peak, self.running = _rss(), True

    def run(self):
        while self.running:
            self.peak = max(self.peak, _rss())
            time.sleep(0.005)

    def take(self) -> int:
        """The peak since the last take, then restart from the current RSS."""
        peak, self.peak = max(self.peak, _rss()), _rss()
        return peak


def _config(size: int):
    from moe_sft.testing import tiny_config

    hidden, layers, experts, inter = SHAPES[size]
    return tiny_config("qwen3_moe", hidden_size=hidden, num_hidden_layers=layers, num_experts=experts,
                       moe_intermediate_size=inter, intermediate_size=2 * inter, num_attention_heads=8,
                       num_key_value_heads=4, head_dim=hidden // 8)  # fmt: skip


def make_checkpoint(size: int, root: Path) -> tuple[Path, int]:
    import torch
    from transformers import AutoModelForCausalLM

    from moe_sft.testing import tiny_tokenizer

    path = root / f"m{size}"
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(_config(size))
    params = sum(p.numel() for p in model.parameters())
    model.save_pretrained(path)
    tiny_tokenizer().save_pretrained(path)
    return path, params


def worker(ckpt: str, mode: str, steps: int, out: str) -> None:
    """One rank: load (partitioned or whole), patch, train `steps` steps; write its peaks."""
    import torch
    from transformers import AutoModelForCausalLM, Trainer, TrainingArguments

    import moe_sft
    from moe_sft.testing import tiny_tokenizer
    from moe_sft.train import deepspeed as ds_glue

    torch.set_num_threads(1)
    ds = json.loads((ROOT / "configs/deepspeed/zero3.json").read_text())
    ds, extra = ds_glue.prepare(ds, {})
    sampler = Sampler()
    sampler.start()
    base = _rss()
    sampler.take()
    args = dict(output_dir=tempfile.mkdtemp(), max_steps=steps, per_device_train_batch_size=1, report_to="none",
                save_strategy="no", logging_strategy="no", disable_tqdm=True, use_cpu=True, optim="sgd", **extra)  # fmt: skip
    if mode == "partitioned":  # what moe-sft train does: the DeepSpeed config exists before the model
        training = TrainingArguments(deepspeed=ds, **args)
        model = AutoModelForCausalLM.from_pretrained(ckpt)
    else:
        model = AutoModelForCausalLM.from_pretrained(ckpt)
        training = TrainingArguments(deepspeed=ds, **args)
    moe_sft.patch_model(model, moe_sft.MoESFTConfig.from_dict({"condenser": {"bias": {"gamma": 1e-3}}}))
    load = sampler.take() - base
    tokenizer = tiny_tokenizer()
    g = torch.Generator().manual_seed(int(os.environ.get("RANK", 0)))
    rows = [{"input_ids": ids, "labels": ids} for ids in torch.randint(3, 100, (8 * steps, 32), generator=g)]
    trainer = Trainer(model=model, args=training, train_dataset=rows, processing_class=tokenizer,
                      callbacks=[moe_sft.MoESFTCallback(expert_load=False)])  # fmt: skip
    trainer.train()
    train = sampler.take() - base
    sampler.running = False
    rank = int(os.environ.get("RANK", 0))
    Path(f"{out}.{rank}").write_text(json.dumps({"rank": rank, "load": load, "train": train}))


def run_job(ckpt: Path, mode: str, world: int, steps: int, tmp: Path) -> list[dict]:
    out = tmp / f"{ckpt.name}-{mode}-{world}"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={world}", __file__,
           "--worker", str(ckpt), mode, str(steps), str(out)]  # fmt: skip
    env = {**os.environ, "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"}
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=3600)
    if proc.returncode != 0:
        raise RuntimeError(proc.stderr[-4000:])
    return [json.loads(Path(f"{out}.{r}").read_text()) for r in range(world)]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    # 800M: the whole-model path at world size 2 needs about 12 GiB per rank (too much for 24 GiB with
    # anything else running); 500M fits
    p.add_argument("--sizes", default="50,200,500", help="model sizes in millions of parameters (50, 200, 500, 800)")
    p.add_argument("--steps", type=int, default=2)
    p.add_argument("--worker", nargs=4, help=argparse.SUPPRESS)
    a = p.parse_args()
    if a.worker:
        worker(a.worker[0], a.worker[1], int(a.worker[2]), a.worker[3])
        return
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        for size in (int(s) for s in a.sizes.split(",")):
            ckpt, params = make_checkpoint(size, tmp)
            single = {mode: run_job(ckpt, mode, 1, a.steps, tmp)[0] for mode in ("whole", "partitioned")}
            for mode in ("whole", "partitioned"):
                two = run_job(ckpt, mode, 2, a.steps, tmp)
                ref = single["whole"]["load"]  # today's load-everything path on one rank
                rows.append((params, mode, single[mode], two, two[1]["load"] / ref))
            shutil.rmtree(ckpt)  # the next size's checkpoint needs the disk
    print("| parameters | loading | ws 1 load / train (GiB) | ws 2 rank 0 load / train | ws 2 rank 1 load / train | rank 1 load / ws 1 whole load |")
    print("|---|---|---|---|---|---|")
    for params, mode, one, two, ratio in rows:
        cell = lambda r: f"{r['load'] / GIB:.2f} / {r['train'] / GIB:.2f}"  # noqa: E731
        print(f"| {params / 1e6:.0f}M | {mode} | {cell(one)} | {cell(two[0])} | {cell(two[1])} | {ratio:.2f}x |")


if __name__ == "__main__":
    main()
