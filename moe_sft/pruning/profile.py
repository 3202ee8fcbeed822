"""Expert profiling: per MoE layer and routed expert, how often and how strongly it is used.

For every MoE layer and expert e, over the non-padding tokens of a data file:
    counts          tokens that selected e (routed or forced slot)
    gate_mass       sum over those tokens of the gate weight w_e the token gives e
                    (after the family's renormalisation and scaling)
    score_mass      sum over all tokens of the router score s_e (softmax / sigmoid)
    max_abs_output  max over those tokens and hidden units of |E_e(x)|, the expert's
                    down_proj output before gate weighting (Su et al., arXiv 2507.23279,
                    find "super experts" by this massive-activation magnitude)

The statistics come from a temporary output hook on each patched layer (removed afterwards);
the model is patched with every method off (stock outputs) for the pass if it is not patched
already, and reverted after. A patched model (e.g. a masked or fine-tuned checkpoint) is
profiled as it runs.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
from pathlib import Path

import torch

from ..config import ConfigError
from ..io import atomic_directory, atomic_write_text
from ..routing import ExpertUsage

logger = logging.getLogger(__name__)

PROFILE_JSON = "profile.json"
HEATMAP_PNG = "usage_heatmap.png"
CUMULATIVE_PNG = "cumulative_usage.png"
FORMAT = "moe_sft.expert_profile/1"
STATS = ("counts", "gate_mass", "score_mass", "max_abs_output")


@dataclasses.dataclass
class ExpertProfile:
    """Per-layer expert statistics; every tensor is (L, E) with row i for decoder layer `layers[i]`."""

    model: str
    model_type: str
    num_hidden_layers: int
    num_experts: int
    top_k: int
    layers: list[int]
    counts: torch.Tensor  # int64
    gate_mass: torch.Tensor  # fp32
    score_mass: torch.Tensor  # fp32
    max_abs_output: torch.Tensor  # fp32
    tokens: int = 0  # non-padding tokens profiled
    texts: int = 0
    data: str = ""

    def row(self, layer_idx: int) -> int:
        return self.layers.index(layer_idx)

    def to_json(self) -> dict:
        out = {"format": FORMAT}
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            out[f.name] = value.tolist() if isinstance(value, torch.Tensor) else value
        return out

    @classmethod
    def from_json(cls, data: dict, where: str = "profile") -> ExpertProfile:
        if data.get("format") != FORMAT:
            raise ConfigError(f"{where}: not an expert profile written by `moe-sft profile` (format {data.get('format')!r})")
        kwargs = {k: v for k, v in data.items() if k != "format"}
        kwargs["counts"] = torch.tensor(kwargs["counts"], dtype=torch.int64)
        for name in STATS[1:]:
            kwargs[name] = torch.tensor(kwargs[name], dtype=torch.float32)
        return cls(**kwargs)

    @classmethod
    def load(cls, directory: str | os.PathLike) -> ExpertProfile:
        path = Path(directory) / PROFILE_JSON
        if not path.is_file():
            raise FileNotFoundError(f"no {PROFILE_JSON} in {str(directory)!r}; create one with `moe-sft profile ... --out DIR`")
        return cls.from_json(json.loads(path.read_text()), str(path))

    def check_matches(self, model) -> None:
        """Refuse a profile taken on a model with other MoE layers or expert counts."""
        from ..adapters import get_adapter

        adapter = get_adapter(model)
        E = adapter.router_spec(model.config).num_experts
        layers = adapter.moe_layer_indices(model)
        if (model.config.model_type, layers, E) != (self.model_type, self.layers, self.num_experts):
            raise ConfigError(
                f"the profile (of {self.model}) is for a {self.model_type} with MoE layers {self.layers} and "
                f"{self.num_experts} experts, but the model is a {model.config.model_type} with MoE layers {layers} "
                f"and {E} experts; profile this model first (`moe-sft profile`)"
            )


# ---- data ---------------------------------------------------------------------------------
def read_texts(path: str, tokenizer, *, limit: int | None = None) -> list[str]:
    """Texts to profile on, read by the training data loader (`moe_sft.data`): any file, folder,
    `save_to_disk` folder or hub id `moe-sft train` reads, in any of its formats, each record
    rendered as training renders it (alpaca records through the Alpaca prompt, with `output` when
    present; chat records through the tokenizer's chat template); `{"text": ...}` records as they are."""
    from ..data import DataError, profile_texts
    from ..train.config import DataConfig

    if limit is not None and limit < 1:
        raise ConfigError(f"--limit {limit}: must be a positive number of records")
    texts = profile_texts(tokenizer, DataConfig(files=[path], max_samples=limit))
    if not any(t.strip() for t in texts):
        raise DataError(f"{path}: no non-empty text to profile on")
    return texts


# ---- the pass -------------------------------------------------------------------------------
class _Recorder:
    """Routing observer of one layer: its usage (the shared `ExpertUsage` reduction) and the
    max |expert output|, for the tokens in `keep`."""

    def __init__(self, num_experts: int, device: torch.device):
        self.keep: torch.Tensor | None = None  # (T,) bool: non-padding tokens of the current batch
        self.usage = ExpertUsage(num_experts, device)
        self.max_abs_output = torch.zeros(num_experts, dtype=torch.float32, device=device)

    @torch.no_grad()
    def __call__(self, routing, x, block) -> None:
        keep = self.keep.to(x.device)
        self.usage.add(routing, keep)
        flat = routing.index[keep].reshape(-1)  # (T'K,) routed then forced ids
        # E_e(x) for every (token, slot) pair in one pass of the block's own experts module:
        # each pair becomes a row with a single slot of gate weight 1. (T'K, H)
        K = routing.index.shape[1]
        ones = torch.ones(flat.numel(), 1, dtype=routing.weights.dtype, device=x.device)
        outputs = block.experts(x[keep].repeat_interleave(K, dim=0), flat.unsqueeze(1), ones)
        self.max_abs_output = self.max_abs_output.to(x.device)
        self.max_abs_output.scatter_reduce_(0, flat, outputs.abs().amax(dim=-1).float(), reduce="amax")


@torch.no_grad()
def profile_model(
    model, tokenizer, texts: list[str], *, batch_size: int = 8, max_length: int = 1024, model_id: str = "", data: str = ""
) -> ExpertProfile:
    """Run `texts` through `model` (batches of `batch_size`, truncated to `max_length` tokens,
    padding excluded) and return the per-layer expert statistics."""
    from tqdm.auto import tqdm

    from ..patching import get_handle, patch_model

    if batch_size < 1 or max_length < 1:
        raise ConfigError(f"batch_size={batch_size}, max_length={max_length}: both must be >= 1")
    handle = get_handle(model)
    own_patch = handle is None
    if own_patch:
        handle = patch_model(model)  # every method off: the stock forward
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token  # padding never reaches the statistics
    recorders = {m.layer_idx: _Recorder(m.controls.spec.num_experts, m.block.gate.weight.device) for m in handle.layers}
    remove = handle.observe(lambda i, routing, x, block: recorders[i](routing, x, block), training_only=False)
    device = model.get_input_embeddings().weight.device
    extra = {"output_router_logits": False} if getattr(model.config, "output_router_logits", False) else {}
    was_training = model.training
    model.eval()
    tokens = 0
    try:
        for start in tqdm(range(0, len(texts), batch_size), desc="profiling", unit="batch"):
            # Right padding: the real tokens keep the positions (and outputs) they have unpadded.
            enc = tokenizer(texts[start : start + batch_size], return_tensors="pt", padding=True, padding_side="right",
                            truncation=True, max_length=max_length)  # fmt: skip
            keep = enc["attention_mask"].reshape(-1).bool()  # token order of the blocks' (B*S, H) input
            for rec in recorders.values():
                rec.keep = keep
            model(input_ids=enc["input_ids"].to(device), attention_mask=enc["attention_mask"].to(device), use_cache=False, **extra)
            tokens += int(keep.sum())
    finally:
        remove()
        if own_patch:
            handle.revert()
        model.train(was_training)
    spec = handle.layers[0].controls.spec
    stack = lambda name: torch.stack([getattr(r.usage, name).cpu() for r in recorders.values()])  # noqa: E731
    return ExpertProfile(
        model=model_id, model_type=model.config.model_type, num_hidden_layers=model.config.num_hidden_layers,
        num_experts=spec.num_experts, top_k=spec.top_k, layers=list(recorders),
        counts=stack("counts"), gate_mass=stack("gate_mass"), score_mass=stack("score_mass"),
        max_abs_output=torch.stack([r.max_abs_output.cpu() for r in recorders.values()]), tokens=tokens, texts=len(texts), data=data,
    )  # fmt: skip


# ---- outputs -------------------------------------------------------------------------------
def _shares(profile: ExpertProfile) -> torch.Tensor:
    """(L, E) share of each layer's selections, each row sorted from most to least used."""
    counts = profile.counts.double()
    return (counts / counts.sum(1, keepdim=True).clamp_min(1)).sort(dim=1, descending=True).values


def plot_heatmap(profile: ExpertProfile, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    shares = _shares(profile).numpy()
    L, E = shares.shape
    fig, ax = plt.subplots(figsize=(min(6 + E * 0.06, 20), min(2.5 + L * 0.25, 16)))
    im = ax.imshow(shares, aspect="auto", cmap="viridis", interpolation="nearest")
    ax.set_xlabel("experts, sorted by usage within the layer (rank)")
    ax.set_ylabel("MoE layer")
    ax.set_yticks(range(L), [str(i) for i in profile.layers])
    ax.set_title(f"{profile.model_type}: expert usage\n({profile.tokens} tokens, top-{profile.top_k} of {E} experts)", fontsize=10)
    fig.colorbar(im, ax=ax, label="share of the layer's selections")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def plot_cumulative(profile: ExpertProfile, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    # (L, E + 1): the curve starts at (0, 0)
    shares = torch.nn.functional.pad(_shares(profile).cumsum(dim=1), (1, 0)).numpy()
    L, E = shares.shape[0], shares.shape[1] - 1
    x = [j / E for j in range(E + 1)]
    cmap = plt.get_cmap("viridis")
    fig, ax = plt.subplots(figsize=(6.5, 4.5))
    for row, layer in enumerate(profile.layers):
        ax.plot(x, shares[row], color=cmap(row / max(L - 1, 1)), lw=1, label=f"layer {layer}" if L <= 12 else None)
    ax.plot([0, 1], [0, 1], "k:", lw=0.8, label="uniform")
    ax.set_xlabel("fraction of experts (most used first)")
    ax.set_ylabel("cumulative share of selections")
    ax.set_title("cumulative expert usage per layer")
    if L > 12:
        sm = plt.cm.ScalarMappable(cmap=cmap, norm=plt.Normalize(profile.layers[0], profile.layers[-1]))
        fig.colorbar(sm, ax=ax, label="MoE layer")
    ax.legend(fontsize=7, loc="lower right")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def write_profile(profile: ExpertProfile, out_dir: str | os.PathLike, *, overwrite: bool = False) -> Path:
    """Write profile.json, the usage heatmap and the cumulative-usage curves, atomically."""
    with atomic_directory(out_dir, overwrite=overwrite) as tmp:
        atomic_write_text(tmp / PROFILE_JSON, json.dumps(profile.to_json()) + "\n")
        plot_heatmap(profile, tmp / HEATMAP_PNG)
        plot_cumulative(profile, tmp / CUMULATIVE_PNG)
    return Path(out_dir)
