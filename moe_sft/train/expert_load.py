"""Expert-load logging: per-layer usage metrics with the Trainer's logs, a heatmap at the end.

The tracker keeps its own counters, fed by an output hook on every patched MoE layer (the
hook reads the routing and returns the output unchanged). It never reads or resets the
layers' `controls.usage`, which methods such as the condenser's bias update consume and reset
on their own schedule, so neither disturbs the other.

Logged every `logging_steps` (summed over the window's forwards and all ranks), per layer i:
  expert_load/layer_i/entropy       entropy of the selection shares / ln(E): 1 = uniform, 0 = one expert
  expert_load/layer_i/active        experts selected at least once
  expert_load/layer_i/max_share, min_share   largest / smallest share of selections
  expert_load/layer_i/bias_min, bias_max     range of the router bias (methods that have one)
plus expert_load/mean_entropy over layers. At the end `expert_load.png` (layers x experts,
share of selections over the whole run) and `expert_load.json` go to the output folder.
"""

from __future__ import annotations

import json
import logging
import math
import os
from pathlib import Path

import torch

from ..io import atomic_write_text
from ..routing import UsageStats, should_record_usage

logger = logging.getLogger(__name__)

FILE_STEM = "expert_load"


def _all_reduce(t: torch.Tensor) -> torch.Tensor:
    t = t.clone()
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        torch.distributed.all_reduce(t)
    return t


class ExpertLoad:
    """Counts expert selections of every patched MoE layer in training forwards."""

    def __init__(self, handle):
        self.handle = handle
        self.layers = {m.layer_idx: m for m in handle.layers}
        device = lambda m: m.block.gate.weight.device  # noqa: E731
        self.window = {i: UsageStats(m.controls.spec.num_experts, device(m)) for i, m in self.layers.items()}
        self.total = {i: UsageStats(m.controls.spec.num_experts, device(m)) for i, m in self.layers.items()}
        for m in handle.layers:
            m.controls.output_hooks.append(self._hook)
        handle.add_undo(self._remove_hooks)

    def _hook(self, block, x, routing, y):
        if should_record_usage(block):
            i = block.moe_sft.layer_idx
            self.window[i].add(routing)
            self.total[i].add(routing)
        return y

    def _remove_hooks(self) -> None:
        for m in self.handle.layers:
            if self._hook in m.controls.output_hooks:
                m.controls.output_hooks.remove(self._hook)

    # ---- metrics ---------------------------------------------------------------------------
    def _counts(self, stats: dict[int, UsageStats]) -> dict[int, torch.Tensor]:
        """Selection counts per layer, summed over ranks (a collective: call on every rank)."""
        return {i: _all_reduce(s.counts).cpu() for i, s in sorted(stats.items())}

    def _bias(self, i: int) -> torch.Tensor | None:
        ctl = self.layers[i].controls
        for name in ("logit_bias", "selection_bias"):
            b = getattr(ctl, name, None)
            if isinstance(b, torch.Tensor):
                return b.detach().float().cpu()
        return None

    def layer_metrics(self, counts: dict[int, torch.Tensor]) -> dict[int, dict[str, float]]:
        out = {}
        for i, c in counts.items():
            total = int(c.sum())
            share = c.double() / max(total, 1)
            nz = share[share > 0]
            m = {
                "entropy": float(-(nz * nz.log()).sum() / math.log(len(c))) if total else 0.0,
                "active": int((c > 0).sum()),
                "max_share": float(share.max()),
                "min_share": float(share.min()),
            }
            bias = self._bias(i)
            if bias is not None:
                m["bias_min"], m["bias_max"] = float(bias.min()), float(bias.max())
            out[i] = m
        return out

    def log_metrics(self) -> dict[str, float]:
        """Metrics of the forwards since the last call, for the Trainer's log; resets the window."""
        counts = self._counts(self.window)
        for s in self.window.values():
            s.reset()
        if not any(int(c.sum()) for c in counts.values()):
            return {}
        per_layer = self.layer_metrics(counts)
        logs = {f"expert_load/layer_{i}/{k}": v for i, m in per_layer.items() for k, v in m.items()}
        logs["expert_load/mean_entropy"] = sum(m["entropy"] for m in per_layer.values()) / len(per_layer)
        return logs

    # ---- whole-run totals ----------------------------------------------------------------------
    def summary(self) -> dict:
        """Totals over the run (a collective: call on every rank)."""
        counts = self._counts(self.total)
        soft = {i: _all_reduce(s.soft).cpu() for i, s in sorted(self.total.items())}
        return {
            "layers": list(counts),
            "counts": [c.tolist() for c in counts.values()],
            "soft": [s.tolist() for s in soft.values()],
            "metrics": {str(i): m for i, m in self.layer_metrics(counts).items()},
        }

    def load_totals(self, summary: dict) -> None:
        """Continue the totals of a resumed run (only rank 0 loads them, so the sum is right)."""
        for i, c, s in zip(summary["layers"], summary["counts"], summary["soft"]):
            if i in self.total:
                self.total[i].counts += torch.tensor(c, device=self.total[i].counts.device)
                self.total[i].soft += torch.tensor(s, device=self.total[i].soft.device)

    @staticmethod
    def write(summary: dict, out_dir: Path) -> None:
        """expert_load.json and expert_load.png (share of selections, layers x experts)."""
        out_dir = Path(out_dir)
        atomic_write_text(out_dir / f"{FILE_STEM}.json", json.dumps(summary, indent=1) + "\n")
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        counts = torch.tensor(summary["counts"], dtype=torch.float64)
        share = counts / counts.sum(dim=1, keepdim=True).clamp_min(1)
        fig, ax = plt.subplots(figsize=(max(4.0, 0.12 * share.shape[1] + 2), max(2.5, 0.25 * share.shape[0] + 1.5)))
        im = ax.imshow(share.numpy(), aspect="auto", cmap="viridis", interpolation="nearest")
        ax.set_xlabel("expert")
        ax.set_ylabel("MoE layer")
        ax.set_yticks(range(len(summary["layers"])), [str(i) for i in summary["layers"]])
        ax.set_title("share of expert selections over training")
        fig.colorbar(im, ax=ax, label="share")
        fig.tight_layout()
        tmp = out_dir / f".{FILE_STEM}.png.tmp"
        fig.savefig(tmp, format="png", dpi=120)
        plt.close(fig)
        os.replace(tmp, out_dir / f"{FILE_STEM}.png")
