"""`moe-sft demo`: a small MoE pre-trained on a synthetic long-tailed corpus, profiled, pruned
and fine-tuned with every method through `moe-sft train`'s code path and with GRPO through
`moe-sft rl`'s, on a CPU in minutes.

    from moe_sft.demo import run_demo
    report = run_demo("outputs/demo", quick=True)
"""

from .run import DemoSettings, run_demo

__all__ = ["DemoSettings", "run_demo"]
