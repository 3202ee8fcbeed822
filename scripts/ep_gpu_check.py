"""Expert parallelism check: a patched model computes the same with and without EP.

    torchrun --nproc_per_node 2 scripts/ep_gpu_check.py                       # GPUs: NCCL; no GPU: gloo
    torchrun --nproc_per_node 8 scripts/ep_gpu_check.py --family deepseek_v3 --override n_routed_experts=32
    torchrun --standalone --nproc_per_node 2 scripts/ep_gpu_check.py --layout tp_ep --out results.pt
    accelerate launch --multi_gpu --num_processes 2 scripts/ep_gpu_check.py --cpu    # gloo, also on GPU machines

For each layout (`tp_ep`: tp_size 2, ep_size 2, fsdp_size WORLD/2; `fsdp_ep`: fsdp_size WORLD,
ep_size WORLD) a tiny model of `--family` is loaded sharded by transformers
(`moe_sft.train.parallel.load_model`), and `--steps` AdamW steps are run in fp32:
- `stock`: the unpatched EP model; `off`: the same, patched with every method off;
- `bias_head`: condenser router bias (phase 1) + MoE-Bias head; `longtail_frozen`: long-tail
  condensers (phase 2) + frozen_router; `lora_attention`: LoRA on attention only. A config that
  `parallel.check_methods` refuses for the layout is reported as refused, not run.
Each run is compared with the single-process model (same weights, the same data-parallel batches
as micro-batches of one step, computed before the process group exists), metrics of `compare`:
logits and gradients of the first step, the loss of every step, logits and gradients of the
later steps (relative), parameters and moe_sft tensors after the last step. `off` is compared
with `stock` the same way: its first forward must be bit-identical, and the rest is too for
families whose patched backward is bit-identical in one process (Qwen3-MoE, OLMoE, Mixtral,
DeepSeek; the gated shared expert of Qwen2-MoE / Qwen3-Next sums its gradient in another order,
~1e-7 apart in one process already). Every moe_sft tensor and trainable parameter outside the
shards (router bias, the head) is compared across ranks (expected: bit-identical).
The trained `bias_head` model is saved and loaded back, single-process and sharded again
(expected: bit-identical).
Trainable parameters that transformers does not shard (the head, LoRA) get what the HF Trainer
gives them for such a model: broadcast from rank 0, gradient averaged over all ranks.

Prints one line per (layout, run) with the largest differences (over ranks); exits 1 if one
is over its tolerance (`--tol NAME=VALUE`, TOLERANCES): 1e-5 absolute for the first step's
logits and gradients, every loss and the moe_sft tensors; 1e-3 relative for later logits and
gradients; lr for the parameters. AdamW divides each gradient element by its running magnitude,
so an element whose gradient is of the order of eps (1e-8), e.g. the embedding row of a token
first seen in the last step, moves by a fraction of lr that rounding decides, and the later
steps inherit that. `--out` saves the numbers.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import sys

import torch
import torch.distributed as dist
import yaml

# The metrics of `compare`; "param" is --lr (see the docstring).
TOLERANCES = {"logits0": 1e-5, "grad0": 1e-5, "loss": 1e-5, "logits": 1e-3, "grad": 1e-3, "extra": 1e-5}
RUNS = {
    "off": {},
    "bias_head": {"condenser": {"bias": {"gamma": 0.01}}, "moe_bias_head": {"apply_to": "all"}},
    "longtail_frozen": {"condenser": {"bias": {"gamma": 0.01}, "condensers": {"num": 1}}, "frozen_router": {}},
    "lora_attention": {"lora": {"experts": False}},
}


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--layout", nargs="+", choices=("tp_ep", "fsdp_ep"), default=["tp_ep", "fsdp_ep"])
    p.add_argument("--family", default="qwen3_moe", help="a moe_sft.testing tiny model_type")
    p.add_argument("--override", nargs="*", default=[], metavar="KEY=VALUE", help="tiny config fields, e.g. hidden_size=256")
    p.add_argument("--runs", nargs="+", choices=tuple(RUNS), default=list(RUNS))
    p.add_argument("--steps", type=int, default=3)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--experts-implementation", help="transformers' experts kernel (eager, grouped_mm, batched_mm)")
    p.add_argument("--cpu", action="store_true", help="run on CPU with gloo even where there are GPUs")
    p.add_argument("--tol", nargs="*", default=[], metavar="NAME=VALUE", help=f"tolerances {TOLERANCES}")
    p.add_argument("--out", help="torch.save the results here (rank 0)")
    return p.parse_args(argv)


def _pairs(items: list[str]) -> dict:
    return {k: yaml.safe_load(v) for k, v in (item.split("=", 1) for item in items)}


@dataclasses.dataclass
class Job:
    """One (layout, run): its ParallelConfig, method blocks and the single-process reference."""

    layout: str
    run: str
    parallel: object
    methods: object
    reference: dict | None = None
    refused: str | None = None


def full(t):
    from torch.distributed.tensor import DTensor

    return t.full_tensor() if isinstance(t, DTensor) else t


def batches(model, dp_size: int, step: int) -> list[dict]:
    """The data-parallel ranks' batches of `step` (a tensor-parallel group shares one)."""
    from moe_sft.testing import tiny_batch

    return [tiny_batch(model, batch=2, seq=12, seed=1000 * step + i) for i in range(dp_size)]


def _to(batch: dict, device) -> dict:
    return {k: v.to(device) for k, v in batch.items()}


def _first_condensers(model, methods):
    """Long-tail condensers need their experts: choose them (the first expert of every MoE
    layer) before any run, so the reference and the EP models use the same ones."""
    import moe_sft

    if methods.condenser is None or methods.condenser.condensers is None:
        return methods
    probe = moe_sft.patch_model(model)
    layers = [m.layer_idx for m in probe.layers]
    probe.revert()
    cc = dataclasses.replace(methods.condenser.condensers, experts={i: [0] for i in layers})
    return dataclasses.replace(methods, condenser=dataclasses.replace(methods.condenser, condensers=cc))


def _patch(model, methods, seed: int):
    """Patch (seeded: the head's gate starts the same everywhere); wrap LoRA in PEFT."""
    import moe_sft

    torch.manual_seed(seed)
    handle = moe_sft.patch_model(model, methods)
    if methods.lora is not None:
        from moe_sft.methods.lora import get_peft_model

        torch.manual_seed(seed + 1)
        model = get_peft_model(model)
    return model, handle


def _trainable(model):
    return [p for p in model.parameters() if p.requires_grad]


def reference(model_fn, methods, dp_size: int, args, device) -> list[dict]:
    """The single-process run: each step sums the data-parallel batches' losses / dp_size.
    Returns what each data-parallel rank should see (its own batch's logits)."""
    model, handle = _patch(model_fn().to(device).train(), methods, seed=7)
    opt = torch.optim.AdamW(_trainable(model), lr=args.lr, foreach=False)
    logits, seen = [], {"loss": [], "grad": []}
    for step in range(args.steps):
        outs = [model(**_to(b, device)) for b in batches(model, dp_size, step)]
        loss = sum(o.loss for o in outs) / dp_size
        loss.backward()
        logits.append([o.logits.detach() for o in outs])
        seen["loss"].append(loss.detach())
        seen["grad"].append({n: p.grad.detach().clone() for n, p in model.named_parameters() if p.grad is not None})
        opt.step()
        opt.zero_grad()
        handle.step()
    seen["param"] = {n: p.detach() for n, p in model.named_parameters()}
    seen["extra"] = {k: v.detach() for k, v in handle.extra_state_dict().items()}
    return [{**seen, "logits": [per_dp[dp] for per_dp in logits]} for dp in range(dp_size)]


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).abs().max() / b.abs().max().clamp_min(1e-30))


def compare(seen: dict, want: dict) -> dict:
    """Largest differences of one run from another (both as `seen` records), by metric:
    logits0 / grad0   absolute, at the first step (before any update)
    loss              absolute, every step (the data-parallel mean)
    logits / grad     relative to the largest reference value, every step after the first
    param, extra      absolute, after the last step (moe_sft tensors: the usage profile apart)"""
    if any(g.keys() != w.keys() for g, w in zip(seen["grad"], want["grad"])):
        raise RuntimeError("the two runs give gradients to different parameters")
    later = range(1, len(seen["loss"]))
    return {
        "logits0": float((seen["logits"][0] - want["logits"][0]).abs().max()),
        "grad0": max(float((g - want["grad"][0][n]).abs().max()) for n, g in seen["grad"][0].items()),
        "loss": max(float((a - b).abs()) for a, b in zip(seen["loss"], want["loss"])),
        "logits": max((_rel(seen["logits"][s], want["logits"][s]) for s in later), default=0.0),
        "grad": max((_rel(g, want["grad"][s][n]) for s in later for n, g in seen["grad"][s].items()), default=0.0),
        "param": max(float((v - want["param"][n]).abs().max()) for n, v in seen["param"].items()),
        "extra": max(
            (float((v.double() - want["extra"][k].double()).abs().max()) for k, v in seen["extra"].items() if "usage_total" not in k),
            default=0.0,
        ),
    }


def ep_run(model_fn, job: Job, args, device, stock_seen: dict | None) -> tuple[dict, dict]:
    """The EP run of `job`: its differences from the reference (and from `stock_seen`), and
    what it saw."""
    from torch.distributed.tensor import DTensor

    from moe_sft.train import parallel as ep

    p = job.parallel
    model = ep.load_model(model_fn(), p, job.methods if job.run != "stock" else None, dtype=torch.float32).train()
    handle = None
    if job.run != "stock":
        model, handle = _patch(model, job.methods, seed=7)
    # What the HF Trainer does for a model sharded at load time (_sync_replicated_trainable_parameters).
    replicated = [q for q in _trainable(model) if not isinstance(q.data, DTensor)]
    for q in replicated:
        with torch.no_grad():
            dist.broadcast(q.data, src=0)
    opt = torch.optim.AdamW(_trainable(model), lr=args.lr, foreach=False)
    dp = dist.get_rank() // p.tp_size
    seen = {"logits": [], "loss": [], "grad": []}
    for step in range(args.steps):
        out = model(**_to(batches(model, p.fsdp_size, step)[dp], device))
        out.loss.backward()
        for q in replicated:
            dist.all_reduce(q.grad, op=dist.ReduceOp.AVG)
        loss = out.loss.detach().clone()
        dist.all_reduce(loss)  # each data-parallel batch counted tp_size times
        seen["logits"].append(full(out.logits).detach())
        seen["loss"].append(loss / dist.get_world_size())
        seen["grad"].append({n: full(q.grad).detach() for n, q in model.named_parameters() if q.grad is not None})
        opt.step()
        opt.zero_grad()
        if handle is not None:
            handle.step()
    seen["param"] = {n: full(q.detach()) for n, q in model.named_parameters()}
    seen["extra"] = {k: full(v.detach()) for k, v in handle.extra_state_dict().items()} if handle is not None else {}
    result = {"refused": None}
    if job.reference is not None:
        want = job.reference[dp]
        result.update(compare(seen, want))
        # The router bias's usage profile: every rank of a tensor-parallel group counts the same tokens.
        result["usage_total_ratio"] = [float(v.sum() / want["extra"][k].sum()) for k, v in seen["extra"].items() if "usage_total" in k]
    if stock_seen is not None:
        result["vs_stock"] = compare(seen, stock_seen)
    # moe_sft tensors and unsharded trainable parameters, as every rank holds them.
    mine = {**{k: v.double() for k, v in seen["extra"].items()}, **{f"param:{i}": q.detach().double() for i, q in enumerate(replicated)}}
    rank_diff = 0.0
    for v in mine.values():
        parts = [torch.zeros_like(v) for _ in range(dist.get_world_size())]
        dist.all_gather(parts, v.contiguous())
        rank_diff = max(rank_diff, max(float((x - parts[0]).abs().max()) for x in parts))
    moved = max((float(v.abs().max()) for k, v in seen["extra"].items() if k.endswith(("logit_bias", "selection_bias"))), default=0.0)
    result.update(ranks=rank_diff, bias_moved=moved, extra_keys=sorted(seen["extra"]))
    if job.run == "bias_head":
        result["save_reload"] = save_reload(model, job, {**seen["param"], **seen["extra"]})
    return result, seen


def save_reload(model, job: Job, state: dict) -> float:
    """Save the trained EP model (every rank joins the gather, rank 0 writes), then load it
    back twice: single-process with `moe_sft.from_pretrained`, and sharded again with
    `parallel.load_model` (how a next phase starts from this one). Largest difference."""
    import shutil
    import tempfile

    import moe_sft
    from moe_sft.train import parallel as ep

    folder = [tempfile.mkdtemp(prefix="ep_gpu_check_") if dist.get_rank() == 0 else None]
    dist.broadcast_object_list(folder, src=0)
    model.save_pretrained(folder[0], is_main_process=dist.get_rank() == 0)
    dist.barrier()
    single = moe_sft.from_pretrained(folder[0], dtype=torch.float32).state_dict()
    sharded = ep.load_model(folder[0], job.parallel, job.methods, dtype=torch.float32).state_dict()
    worst = 0.0
    for name, value in state.items():
        for loaded in (single[name], full(sharded[name])):
            worst = max(worst, float((value.double().cpu() - loaded.double().cpu()).abs().max()))
    dist.barrier()
    if dist.get_rank() == 0:
        shutil.rmtree(folder[0])
    return worst


def _worst_over_ranks(res: dict, device) -> dict:
    """Each difference as the largest any rank measured (ranks compare their own batches)."""
    keys = sorted(k for k, v in res.items() if isinstance(v, float))
    values = torch.tensor([res[k] for k in keys], dtype=torch.float64, device=device)
    dist.all_reduce(values, op=dist.ReduceOp.MAX)
    out = {**res, **dict(zip(keys, values.tolist()))}
    if "vs_stock" in res:
        out["vs_stock"] = _worst_over_ranks(res["vs_stock"], device)
    return out


def _shown(res: dict) -> str:
    def fmt(v):
        return f"{v:.2e}" if isinstance(v, float) else "{" + _shown(v) + "}" if isinstance(v, dict) else str(v)

    return ", ".join(f"{k} {fmt(v)}" for k, v in res.items() if k != "extra_keys" and v is not None)


def main(argv=None) -> int:
    args = parse_args(argv)
    tol = {**TOLERANCES, "param": args.lr, **{k: float(v) for k, v in _pairs(args.tol).items()}}
    overrides = _pairs(args.override)
    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "1")))
    gpu = torch.cuda.is_available() and not args.cpu
    local_rank = int(os.environ.get("LOCAL_RANK", 0))
    device = torch.device("cuda", local_rank) if gpu else torch.device("cpu")
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world < 2:
        sys.exit(
            "ep_gpu_check: expert parallelism needs at least 2 processes; launch with `torchrun --nproc_per_node 2 "
            "scripts/ep_gpu_check.py` (or `accelerate launch --multi_gpu --num_processes 2 ...`)"
        )
    if gpu and local_rank >= torch.cuda.device_count():
        sys.exit(
            f"ep_gpu_check: local rank {local_rank} but {torch.cuda.device_count()} GPU(s) here; NCCL needs one GPU per "
            "rank: launch --nproc_per_node <= the GPU count, or pass --cpu (gloo)"
        )

    import moe_sft
    from moe_sft.config import ConfigError
    from moe_sft.testing import tiny_model
    from moe_sft.train import parallel as ep

    # The same seed on every rank: the same weights everywhere.
    model_fn = lambda: tiny_model(args.family, experts_implementation=args.experts_implementation, **overrides)  # noqa: E731
    probe = model_fn()
    layouts = {
        "tp_ep": ep.ParallelConfig(ep_size=2, tp_size=2).resolve(world),
        "fsdp_ep": ep.ParallelConfig(ep_size=world).resolve(world),
    }
    jobs = []
    for layout in args.layout:
        p = layouts[layout]
        ep.check_model(p, probe.config)
        for run in args.runs:
            methods = _first_condensers(probe, moe_sft.MoESFTConfig.from_dict(RUNS[run]))
            job = Job(layout, run, p, methods)
            try:
                ep.check_methods(methods, p, probe.config)
            except ConfigError as err:
                job.refused = str(err)
            jobs.append(job)
    # Single-process references first: no process group exists yet, so nothing is all-reduced.
    for job in jobs:
        if job.refused is None:
            job.reference = reference(model_fn, job.methods, job.parallel.fsdp_size, args, device)

    if gpu:
        torch.cuda.set_device(device)
    dist.init_process_group("nccl" if gpu else "gloo", device_id=device if gpu else None)
    rank = dist.get_rank()
    results, failed = {}, []
    for layout in args.layout:
        stock_job = Job(layout, "stock", layouts[layout], moe_sft.MoESFTConfig())
        stock, stock_seen = ep_run(model_fn, stock_job, args, device, None)
        results[(layout, "stock")] = stock
        for job in (j for j in jobs if j.layout == layout):
            if job.refused is not None:
                results[(layout, job.run)] = {"refused": job.refused}
                continue
            res, _ = ep_run(model_fn, job, args, device, stock_seen if job.run == "off" else None)
            res = _worst_over_ranks(res, device)
            results[(layout, job.run)] = res
            over = [k for k in tol if res[k] > tol[k]]
            if job.run == "off":
                over += [f"vs_stock.{k}" for k in tol if res["vs_stock"][k] > tol[k]]
                if res["vs_stock"]["logits0"] != 0.0:
                    over.append("vs_stock.logits0 (the first forward must be bit-identical)")
            if res["ranks"] != 0.0:
                over.append("ranks")
            if job.run in ("bias_head", "longtail_frozen") and res["bias_moved"] == 0.0:
                over.append("bias_moved")
            if res.get("save_reload", 0.0) != 0.0:
                over.append("save_reload")
            failed += [f"{layout}/{job.run}: {k}" for k in over]
    if rank == 0:
        device_name = torch.cuda.get_device_name(device) if gpu else "CPU"
        print(f"ep_gpu_check: {world} ranks on {device_name} ({dist.get_backend()}), {args.family}, {args.steps} steps, tol {tol}")
        for (layout, run), res in results.items():
            print(f"  {layout:8s} {run:16s} {_shown(res)}")
        print("FAILED: " + "; ".join(failed) if failed else "all checks passed")
        if args.out:
            torch.save({"results": results, "tolerances": tol, "world": world, "device": device_name, "failed": failed}, args.out)
    dist.barrier()
    dist.destroy_process_group()
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
