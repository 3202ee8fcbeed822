"""GRPO step time with routing replay against without, and generation speed of the patched model
against stock, both in one process, interleaved.

    python scripts/bench_rl.py [--steps 9] [--warmup 2] [--threads 1] [--layers 4] [--completion 48]

1. GRPO step (moe_sft.rl.MoEGRPOTrainer, TRL's GRPO: generate, score, train, optimizer step) on
   one model per variant, each built from the same weights, steps taken round-robin:
       none      routing_replay none, metrics off (TRL's GRPO with the router-logits fix only)
       rollout   routing_replay rollout, metrics off (record in generate, replay in training)
       rollout + metrics  the default: also the mismatch / ratio / entropy metrics
   Learning rate 0 and min_new_tokens = max_new_tokens with the same seed per round: every
   variant generates the same tokens, so the steps differ only by what the variant does.
   Target: rollout / none <= 1.03.
   Each round runs every variant once, starting with a different one each round (no variant
   always pays for coming first).
2. Generation (transformers' generate, KV cache, sampling, fixed length) of the stock model, the
   patched model (every method off) and the patched model recording the routing as rollout
   replay does, on one model instance patched / reverted per round. Target: patched / stock
   <= 1.05 in time.
Prints Markdown tables: medians, quartiles and the median of the per-round time ratios.
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import platform
import statistics
import sys
import tempfile
import time

import torch

SHAPE = dict(hidden_size=256, num_experts=32, num_experts_per_tok=4, moe_intermediate_size=256, num_attention_heads=4,
             num_key_value_heads=2, head_dim=64, vocab_size=1024, norm_topk_prob=True)  # fmt: skip
PROMPTS, GENERATIONS = 4, 4  # per step: 4 prompts x 4 completions


def _model(layers: int):
    from moe_sft.testing import tiny_model

    return tiny_model("qwen3_moe", experts_implementation="grouped_mm", num_hidden_layers=layers, **SHAPE)


def _dataset(n: int):
    from datasets import Dataset

    return Dataset.from_list([{"prompt": f"<s>user: What is {i % 10} + {(3 * i) % 10}? Think step by step.</s>\n<s>assistant: "}
                              for i in range(n)])  # fmt: skip


def _const_reward(completions, **kwargs):
    return [float(len(c) % 3) for c in completions]


def _trainer(layers: int, completion: int, replay: str, metrics: bool, steps: int, out: str):
    from trl import GRPOConfig

    import moe_sft
    from moe_sft.rl import MoEGRPOTrainer
    from moe_sft.testing import tiny_tokenizer

    model = _model(layers).train()
    moe_sft.patch_model(model, moe_sft.MoESFTConfig())
    args = GRPOConfig(output_dir=out, per_device_train_batch_size=PROMPTS * GENERATIONS, num_generations=GENERATIONS,
                      max_completion_length=completion, generation_kwargs={"min_new_tokens": completion}, learning_rate=0.0,
                      max_steps=steps, bf16=False, gradient_checkpointing=False, report_to="none", save_strategy="no",
                      logging_steps=10**6, seed=0, top_entropy_quantile=0.2)  # fmt: skip
    trainer = MoEGRPOTrainer(model=model, reward_funcs=[_const_reward], args=args, train_dataset=_dataset(PROMPTS * steps * 2),
                             processing_class=tiny_tokenizer(), routing_replay=replay, routing_metrics=metrics)  # fmt: skip
    # What Trainer.train sets up before its loop (the steps below are that loop's body, timed).
    trainer.create_optimizer_and_scheduler(num_training_steps=steps)
    trainer.current_gradient_accumulation_steps = 1
    return trainer, iter(trainer.get_train_dataloader())


def _quartiles(ts: list[float]) -> str:
    """The middle half of the samples: the noise the ratios should be read against."""
    q = statistics.quantiles(ts, n=4)
    return f"{q[0]:.3f}-{q[2]:.3f}"


def _paired_ratio(ts: list[float], base: list[float]) -> float:
    """Median over rounds of this variant's time over the baseline's in the same round: the
    variants of a round run back to back, so load changes of a shared machine mostly cancel."""
    return statistics.median(t / b for t, b in zip(ts, base))


def _rotated(names: list[str], r: int) -> list[str]:
    return names[r % len(names) :] + names[: r % len(names)]


def _grpo_step(trainer, batches, seed: int) -> float:
    batch = next(batches)
    gc.collect()
    torch.manual_seed(seed)  # the same sampled tokens for every variant
    t0 = time.perf_counter()
    # generation, rewards, scoring forwards (TRL's _prepare_inputs), then training forward + backward
    trainer.training_step(trainer.model, batch, num_items_in_batch=None)
    trainer.optimizer.step()
    trainer.optimizer.zero_grad(set_to_none=True)
    return time.perf_counter() - t0


def bench_grpo(args) -> str:
    """The GRPO step table (Markdown)."""
    variants = {"none": ("none", False), "rollout": ("rollout", False), "rollout + metrics": ("rollout", True)}
    rounds = args.warmup + args.steps
    with tempfile.TemporaryDirectory() as out:
        trainers = {name: _trainer(args.layers, args.completion, replay, metrics, rounds, out) for name, (replay, metrics) in variants.items()}
        times: dict[str, list[float]] = {name: [] for name in variants}
        for r in range(rounds):
            for name in _rotated(list(trainers), r):
                trainer, batches = trainers[name]
                t = _grpo_step(trainer, batches, seed=r)
                if r >= args.warmup:
                    times[name].append(t)
    lines = [
        f"GRPO step: qwen3_moe {args.layers} layers, {SHAPE['num_experts']} experts top-{SHAPE['num_experts_per_tok']}, hidden "
        f"{SHAPE['hidden_size']}, vocab {SHAPE['vocab_size']}; {PROMPTS} prompts x {GENERATIONS} completions of {args.completion} "
        f"tokens; fp32, grouped_mm; median of {args.steps} steps after {args.warmup} warm-up, variants round-robin",
        "",
        "| variant | median step (s) | quartiles (s) | ratio to none (median of per-round ratios) |",
        "|---|---|---|---|",
    ]
    lines += [f"| {name} | {statistics.median(ts):.3f} | {_quartiles(ts)} | {_paired_ratio(ts, times['none']):.3f} |" for name, ts in times.items()]
    return "\n".join(lines) + "\n"


def _generate(model, enc, completion: int, seed: int) -> float:
    torch.manual_seed(seed)
    t0 = time.perf_counter()
    with torch.no_grad():
        model.generate(**enc, do_sample=True, max_new_tokens=completion, min_new_tokens=completion, pad_token_id=0, output_router_logits=False)
    return time.perf_counter() - t0


def bench_generation(args) -> str:
    """The generation table (Markdown)."""
    import moe_sft
    from moe_sft.rl import GenerationRecorder
    from moe_sft.testing import tiny_tokenizer

    model = _model(args.layers).eval()
    tok = tiny_tokenizer()
    enc = tok([row["prompt"] for row in _dataset(PROMPTS * GENERATIONS)], return_tensors="pt", padding=True, padding_side="left")
    times: dict[str, list[float]] = {"stock": [], "patched": [], "patched + recording": []}
    for r in range(args.warmup + args.steps):
        for name in _rotated(list(times), r):
            gc.collect()
            handle = moe_sft.patch_model(model) if name != "stock" else None
            recording = GenerationRecorder(handle, temperature=1.0, logps=False) if name == "patched + recording" else None
            if recording is not None:
                with recording:
                    t = _generate(model, enc, args.completion, r)
            else:
                t = _generate(model, enc, args.completion, r)
            if handle is not None:
                handle.revert()
            if r >= args.warmup:
                times[name].append(t)
    tokens = enc["input_ids"].shape[0] * args.completion
    lines = [
        f"Generation: the same model, {enc['input_ids'].shape[0]} sequences x {args.completion} new tokens (sampling, KV cache); "
        f"median of {args.steps} after {args.warmup} warm-up, variants round-robin",
        "",
        "| variant | median time (s) | quartiles (s) | tokens/s | time ratio to stock (median of per-round ratios) |",
        "|---|---|---|---|---|",
    ]
    for name, ts in times.items():
        med = statistics.median(ts)
        lines.append(f"| {name} | {med:.3f} | {_quartiles(ts)} | {tokens / med:.0f} | {_paired_ratio(ts, times['stock']):.3f} |")
    return "\n".join(lines) + "\n"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=9)
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--completion", type=int, default=48, help="new tokens per completion")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    with contextlib.redirect_stdout(sys.stderr):  # what the libraries print while measuring (DeepSpeed's notices)
        tables = [bench_grpo(args), bench_generation(args)]
    print(f"torch {torch.__version__}, {platform.processor() or platform.machine()}, {args.threads} thread(s)")
    print()
    print("\n".join(tables), end="")


if __name__ == "__main__":
    main()
