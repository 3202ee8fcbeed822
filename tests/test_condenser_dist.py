"""Router-bias usage is all-reduced over data-parallel ranks: two CPU processes (torchrun,
gloo) train on different data for three optimizer steps (two micro-batches each, no DDP and
no buffer broadcast, as under DeepSpeed) and must end with identical biases.

The test runs this file under torchrun; the worker (`__main__`) writes what it saw, and
the assertions are made here, in the test process.
"""

import os
import sys
from pathlib import Path

import torch
from _launch import run_job

STEPS, MICRO = 3, 2


def test_two_ranks_hold_identical_biases(tmp_path):
    out = tmp_path / "ranks.pt"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MOE_SFT_TEST_THREADS": "1"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", __file__, str(out)]
    proc = run_job(cmd, outputs=(out,), env=env, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    seen = torch.load(out)
    gamma = seen["gamma"]
    (b0, b1), (last0, last1), (u0, u1) = seen["bias"], seen["before_last"], seen["local_usage"]
    assert b0.abs().sum() > 0  # the biases moved
    assert torch.equal(b0, b1)  # ... identically on both ranks
    for layer in range(b0.shape[0]):
        # the ranks saw different data: their local usage would give different updates
        assert not torch.equal(torch.sign(u0[layer] - u0[layer].mean()), torch.sign(u1[layer] - u1[layer].mean()))
        # the update used the usage summed over both ranks
        total = (u0[layer] + u1[layer]).double()
        want = last0[layer] + gamma * torch.sign(total - total.mean()).float()
        torch.testing.assert_close(b0[layer], want, atol=1e-7, rtol=0)


def _worker(out: Path) -> None:
    import torch.distributed as dist

    import moe_sft
    from moe_sft.methods.condenser import CondenserConfig, RouterBiasConfig, router_bias, update_router_bias
    from moe_sft.testing import tiny_batch, tiny_model

    torch.set_num_threads(1)
    dist.init_process_group("gloo")
    rank = dist.get_rank()
    gamma = 0.01
    model = tiny_model("qwen3_moe").train()  # same seed: same start on every rank
    handle = moe_sft.patch_model(model, moe_sft.MoESFTConfig(condenser=CondenserConfig(bias=RouterBiasConfig(gamma=gamma))))
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    for step in range(STEPS):
        for micro in range(MICRO):
            model(**tiny_batch(model, seed=1000 * rank + 10 * step + micro)).loss.backward()
        # this rank's own usage of the step (the update all-reduces and then resets it)
        local = torch.stack([handle.state["condenser"].step_usage[m.layer_idx].score_mass.clone() for m in handle.layers])
        before = torch.stack([b.clone() for b in router_bias(handle).values()])
        opt.step()
        opt.zero_grad()
        update_router_bias(handle)
    bias = torch.stack(list(router_bias(handle).values()))
    gathered = {}
    for name, t in (("bias", bias), ("before_last", before), ("local_usage", local)):
        parts = [torch.zeros_like(t) for _ in range(dist.get_world_size())]
        dist.all_gather(parts, t)
        gathered[name] = parts
    if rank == 0:
        torch.save({**gathered, "gamma": gamma}, out)
    dist.destroy_process_group()


if __name__ == "__main__":
    _worker(Path(sys.argv[1]))
