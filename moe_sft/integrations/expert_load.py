"""Expert-load logging: per-layer usage metrics with the Trainer's logs, a heatmap at the end.

`ExpertLoad` observes the routing record of every patched layer in training forwards (the
one record every usage statistic reduces over) and never touches the state methods keep for
themselves (e.g. the condenser's step usage), so neither disturbs the other.

Logged every `logging_steps` (summed over the window's forwards and all ranks), per layer i:
  expert_load/layer_i/entropy       entropy of the selection shares / ln(E): 1 = uniform, 0 = one expert
  expert_load/layer_i/active        experts selected at least once
  expert_load/layer_i/max_share, min_share   largest / smallest share of selections
plus expert_load/mean_entropy over layers (methods add their own, e.g. the router bias range).
Whole-run totals are reduced over ranks whenever they are saved (`flush`), so every rank holds
the same totals and a checkpoint's copy is exact. At the end `expert_load.png` (layers x
experts, share of selections) and `expert_load.json` go to the output folder.
"""

from __future__ import annotations

import json
import logging
import math
import os
from pathlib import Path

import torch

from ..io import atomic_write_text
from ..routing import ExpertUsage

logger = logging.getLogger(__name__)

FILE_STEM = "expert_load"


class ExpertLoad:
    """Counts expert selections of every patched MoE layer in training forwards."""

    def __init__(self, handle):
        self.handle = handle
        sizes = {m.layer_idx: (m.controls.spec.num_experts, m.block.gate.weight.device) for m in handle.layers}
        self.window = {i: ExpertUsage(E, d) for i, (E, d) in sizes.items()}  # since the last log
        self.pending = {i: ExpertUsage(E, d) for i, (E, d) in sizes.items()}  # since the last flush
        self.totals = {i: {"counts": [0] * E, "soft": [0.0] * E} for i, (E, _) in sizes.items()}  # all ranks
        self.remove = handle.observe(self._observe, training_only=True)

    def _observe(self, layer_idx, routing, x, block) -> None:
        self.window[layer_idx].add(routing)
        self.pending[layer_idx].add(routing)

    # ---- metrics ---------------------------------------------------------------------------
    @staticmethod
    def layer_metrics(counts: dict[int, torch.Tensor]) -> dict[int, dict[str, float]]:
        out = {}
        for i, c in counts.items():
            total = int(c.sum())
            share = c.double() / max(total, 1)
            nz = share[share > 0]
            out[i] = {
                "entropy": float(-(nz * nz.log()).sum() / math.log(len(c))) if total else 0.0,
                "active": int((c > 0).sum()),
                "max_share": float(share.max()),
                "min_share": float(share.min()),
            }
        return out

    def log_metrics(self) -> dict[str, float]:
        """Metrics of the forwards since the last call (a collective: call on every rank)."""
        counts = {i: u.all_reduce().counts.cpu() for i, u in sorted(self.window.items())}
        for u in self.window.values():
            u.reset()
        if not any(int(c.sum()) for c in counts.values()):
            return {}
        per_layer = self.layer_metrics(counts)
        logs = {f"expert_load/layer_{i}/{k}": v for i, m in per_layer.items() for k, v in m.items()}
        logs["expert_load/mean_entropy"] = sum(m["entropy"] for m in per_layer.values()) / len(per_layer)
        return logs

    # ---- whole-run totals ----------------------------------------------------------------------
    def flush(self) -> None:
        """Fold every rank's usage since the last flush into the totals (a collective)."""
        for i, u in self.pending.items():
            reduced = u.all_reduce()
            t = self.totals[i]
            t["counts"] = [a + b for a, b in zip(t["counts"], reduced.counts.tolist())]
            t["soft"] = [a + b for a, b in zip(t["soft"], reduced.score_mass.tolist())]
            u.reset()

    def flushed_totals(self) -> dict:
        """The totals as of the last flush (no collective): layers, counts, soft."""
        layers = sorted(self.totals)
        return {
            "layers": layers,
            "counts": [self.totals[i]["counts"] for i in layers],
            "soft": [self.totals[i]["soft"] for i in layers],
        }

    def summary(self) -> dict:
        """Totals over the run with per-layer metrics (flushes first: a collective)."""
        self.flush()
        out = self.flushed_totals()
        counts = {i: torch.tensor(c) for i, c in zip(out["layers"], out["counts"])}
        out["metrics"] = {str(i): m for i, m in self.layer_metrics(counts).items()}
        return out

    def load_totals(self, summary: dict) -> None:
        """Continue the totals of a resumed run (every rank: the totals are global)."""
        for i, c, s in zip(summary["layers"], summary["counts"], summary["soft"]):
            if i in self.totals:
                self.totals[i] = {"counts": list(c), "soft": list(s)}

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
