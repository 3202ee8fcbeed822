"""Patch a model instance explicitly and reversibly.

`patch_model(model, config)`:
1. resolves the config for this model (every method's defaults, the aux-loss settings) and
   runs every method's `check` (combinations), before touching the model;
2. swaps each sparse MoE block's class for a subclass running the generic forward and attaches
   a `MoEControls` module (`block.moe_sft`) holding that layer's extension-point state;
3. applies `routing.disabled_experts`, the aux-loss settings and `track_usage`, then lets each
   enabled method install itself (its state lands in `handle.state[name]`);
4. checks once, for every layer, that the routing every method asked for can be served;
5. makes `model.save_pretrained` write complete patched checkpoints (`moe_sft.checkpoint`).
`PatchHandle.revert()` undoes all of it in reverse order, leaving the stock model.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import logging
import warnings
import weakref
from typing import Any, Callable

import torch
from torch import nn
from torch.optim.optimizer import register_optimizer_step_post_hook

from .adapters import FamilyAdapter, PatchError, get_adapter
from .checkpoint import save_patched
from .config import ConfigError, config_class
from .moe_forward import patched_class
from .plugins import check_config, enabled_methods, registered_methods, resolve_config
from .routing import ExpertUsage, MoEControls

logger = logging.getLogger(__name__)

_HANDLE_ATTR = "_moe_sft_handle"


@dataclasses.dataclass
class MoELayer:
    """One patched sparse MoE block: its decoder-layer index, module name and controls."""

    layer_idx: int
    name: str
    block: nn.Module
    controls: MoEControls


class PatchHandle:
    """What `patch_model` returns: the patched layers, their controls, each method's state,
    per-step work (`step()`) and `revert()`."""

    def __init__(self, model: nn.Module, adapter: FamilyAdapter, config):
        self.model = model
        self.adapter = adapter
        self.config = config  # the resolved config: what runs, what checkpoints save
        self.layers: list[MoELayer] = []
        self.state: dict[str, Any] = {}  # method name -> what its `apply` returned
        self.saving_checkpoint = False  # set around Trainer checkpoint saves (runtime layout)
        self.driven = False  # a MoESFTCallback runs the per-step work
        self.launch = None  # the trainer's plugins.Launch, set by MoESFTCallback
        self._undo: list[Callable[[], None]] = []
        self._stock_keys: frozenset[str] = frozenset(model.state_dict().keys())
        self._stock_config: dict[str, Any] = {}  # model.config attributes the patch changed
        self._usage: dict[int, ExpertUsage] = {}
        self._extra: frozenset[str] | None = None
        self._stepped = False  # an optimizer step ran since the last `step()`
        self._warned = False
        self.active = True

    # ---- for methods -------------------------------------------------------------------
    def add_undo(self, fn: Callable[[], None]) -> None:
        """Register an action that `revert()` runs (in reverse order of registration)."""
        self._undo.append(fn)

    def set_model_config(self, name: str, value: Any) -> None:
        """Set `model.config.<name>` for as long as the patch lives; saved checkpoints keep the
        value the model was loaded with (`stock_config`)."""
        config = self.model.config
        if name not in self._stock_config:
            self._stock_config[name] = getattr(config, name, None)

            def undo(name=name):
                setattr(config, name, self._stock_config.pop(name))

            self.add_undo(undo)
        setattr(config, name, value)

    def set_model_attr(self, name: str, value: Any) -> None:
        """Set an attribute of the model instance (e.g. `router_aux_loss_coef`), undone on revert."""
        model, before = self.model, getattr(self.model, name)
        setattr(model, name, value)
        self.add_undo(lambda: setattr(model, name, before))

    @contextlib.contextmanager
    def stock_config(self):
        """Within the block, `model.config` holds the values the model was loaded with."""
        config, current = self.model.config, {k: getattr(self.model.config, k) for k in self._stock_config}
        for k, v in self._stock_config.items():
            setattr(config, k, v)
        try:
            yield config
        finally:
            for k, v in current.items():
                setattr(config, k, v)

    def observe(self, fn: Callable, *, training_only: bool = True) -> Callable[[], None]:
        """Call `fn(layer_idx, routing, x, block)` on every routing of every patched layer;
        returns the remover (also run by revert)."""
        removers = [m.controls.observe(fn, training_only=training_only) for m in self.layers]

        def remove():
            for r in removers:
                r()

        self.add_undo(remove)
        return remove

    @contextlib.contextmanager
    def observing(self, fn: Callable, *, training_only: bool = False):
        remove = self.observe(fn, training_only=training_only)
        try:
            yield fn
        finally:
            remove()

    # ---- for users ---------------------------------------------------------------------
    def methods(self) -> list[tuple[Any, Any]]:
        """(method plug-in, its resolved block) for every enabled method."""
        return enabled_methods(self.config)

    def step(self) -> None:
        """The per-optimizer-step work of every method (condenser bias update, ESFT slice
        restore). Call it once after every `optimizer.step()` in a loop of your own;
        `moe_sft.MoESFTCallback` calls it inside any transformers Trainer."""
        for method, _block in self.methods():
            if method.needs_step:
                method.on_step(self, self.state.get(method.name))
        self._stepped = False

    def usage(self, reset: bool = False) -> dict[int, ExpertUsage]:
        """Expert usage per MoE layer index in training forwards (with `track_usage: true`)."""
        if reset:
            for stats in self._usage.values():
                stats.reset()
        return dict(self._usage)

    def refresh_extra_keys(self) -> None:
        """Record the names of the tensors the patch added (after patching, or after a method
        added more). Fixed from then on: wrappers such as PEFT rename the modules they wrap."""
        self._extra = frozenset(k for k in self.model.state_dict() if k not in self._stock_keys)

    def extra_keys(self) -> frozenset[str]:
        """Names of the tensors the patch added to the model's state dict."""
        if self._extra is None:
            return frozenset(k for k in self.model.state_dict() if k not in self._stock_keys)
        return self._extra

    def extra_state_dict(self) -> dict[str, torch.Tensor]:
        """The tensors the patch added to the model's state dict (saved in patched checkpoints)."""
        keys = self.extra_keys()
        return {k: v for k, v in self.model.state_dict().items() if k in keys}

    def revert(self) -> None:
        """Restore the stock model: undo every method, then every block swap."""
        if not self.active:
            raise PatchError("this patch was already reverted")
        while self._undo:
            self._undo.pop()()
        delattr(self.model, _HANDLE_ATTR)
        self.active = False
        logger.info("moe_sft: reverted %d MoE layers to the stock %s", len(self.layers), type(self.model).__name__)

    def __repr__(self) -> str:
        state = "active" if self.active else "reverted"
        return f"PatchHandle({type(self.model).__name__}, {len(self.layers)} MoE layers, {state})"


def get_handle(model: nn.Module) -> PatchHandle | None:
    """The active `PatchHandle` of `model`, or None if it is not patched."""
    return getattr(model, _HANDLE_ATTR, None)


def find_handle(model: nn.Module) -> PatchHandle | None:
    """The handle of `model` or of the patched model inside a wrapper (PEFT, DeepSpeed, DDP,
    torch.compile): the first submodule that carries one."""
    if not isinstance(model, nn.Module):
        return None
    return next((get_handle(m) for m in model.modules() if get_handle(m) is not None), None)


def step(model: nn.Module) -> None:
    """`find_handle(model).step()`: per-optimizer-step work, for training loops of your own."""
    handle = find_handle(model)
    if handle is None:
        raise PatchError(f"{type(model).__name__} is not patched by moe_sft (moe_sft.patch_model)")
    handle.step()


# ---- missing per-step work: warn once --------------------------------------------------------
_STEPPING: weakref.WeakSet = weakref.WeakSet()  # live handles whose methods need `step()`
_hook: dict[str, Any] = {}


def _after_optimizer_step(optimizer, args, kwargs) -> None:
    for handle in list(_STEPPING):
        handle._stepped = True


def _watch_steps(handle: PatchHandle) -> None:
    """Warn once when a training forward follows an optimizer step that no `step()` served:
    the router bias (or the ESFT restore) would silently never run."""
    if "post" not in _hook:
        _hook["post"] = register_optimizer_step_post_hook(_after_optimizer_step)
    _STEPPING.add(handle)
    handle.add_undo(lambda: _STEPPING.discard(handle))
    names = [m.name for m, _ in handle.methods() if m.needs_step]

    def check(layer_idx, routing, x, block):
        if handle._stepped and not handle.driven and not handle._warned:
            handle._warned = True
            message = (
                f"moe_sft: {', '.join(names)} need(s) work once per optimizer step, but an optimizer step ran without "
                "it, so their state (e.g. the condenser's router bias) does not train. Add "
                "`callbacks=[moe_sft.MoESFTCallback()]` to your Trainer, or call `moe_sft.step(model)` after every "
                "optimizer.step() in a loop of your own."
            )
            logger.warning(message)
            warnings.warn(message, UserWarning, stacklevel=2)

    handle.layers[0].controls.observe(check, training_only=True)


# ---- patching --------------------------------------------------------------------------------
def _patch_block(handle: PatchHandle, layer_idx: int, name: str, block: nn.Module) -> MoELayer:
    adapter = handle.adapter
    spec = adapter.router_spec(handle.model.config)
    original_cls = type(block)
    controls = MoEControls(spec, layer_idx).to(block.gate.weight.device)
    block.__class__ = patched_class(original_cls)
    block._moe_sft_adapter = adapter
    block.moe_sft = controls
    # DeepSpeed ZeRO-3 "leaf": gather the whole block's parameters when it is entered, instead of
    # tracing each submodule's fetch order. Methods read expert tensors outside the experts
    # module's own call (DenseMixer's dense pass, ESFT's slices), and PEFT's wrapper around the
    # fused experts fetches them out of the traced order, which ZeRO-3 otherwise refuses.
    leaf_before = block.__dict__.get("_z3_leaf")
    block._z3_leaf = True

    def undo():
        del block.moe_sft
        del block._moe_sft_adapter
        if leaf_before is None:
            del block._z3_leaf
        else:
            block._z3_leaf = leaf_before
        block.__class__ = original_cls

    handle.add_undo(undo)
    return MoELayer(layer_idx, name, block, controls)


def apply_routing_config(handle: PatchHandle) -> None:
    """Set each layer's `disabled` buffer from `handle.config.routing` (validated against the
    model: layer and expert ids exist; whether enough experts survive is checked once every
    method is installed)."""
    cfg = handle.config.routing
    if cfg is None:
        return
    by_idx = {m.layer_idx: m for m in handle.layers}
    for key, experts in (cfg.disabled_experts or {}).items():
        layer_idx = int(key)
        if layer_idx not in by_idx:
            raise ConfigError(
                f"routing.disabled_experts names layer {layer_idx}, which is not a sparse MoE layer; "
                f"MoE layers: {sorted(by_idx)}"
            )
        ctl = by_idx[layer_idx].controls
        E = ctl.spec.num_experts
        bad = [e for e in experts if not 0 <= e < E]
        if bad:
            raise ConfigError(f"routing.disabled_experts[{layer_idx}]: expert ids {bad} out of range 0..{E - 1}")
        mask = torch.zeros(E, dtype=torch.bool, device=by_idx[layer_idx].block.gate.weight.device)
        mask[list(experts)] = True
        ctl.set_tensor("disabled", mask)
        ctl.expert_ids["disabled"] = sorted(set(experts))
        ctl.claim("disabled", "routing.disabled_experts")


def check_routing_budget(handle: PatchHandle) -> None:
    """Every layer can serve the routing the patch asks for: the routed picks per token come
    from experts that are neither disabled nor always active, and, with group-limited routing,
    from the groups a token keeps. Raises ConfigError naming the blocks that set each part."""
    for m in handle.layers:
        ctl, spec = m.controls, m.controls.spec
        E, k = spec.num_experts, ctl.num_routed if ctl.num_routed is not None else spec.top_k
        disabled = set(ctl.expert_ids.get("disabled", ())) if ctl.disabled is not None else set()
        forced = set(ctl.expert_ids.get("forced", ())) if ctl.forced is not None else set()
        who = {point: ctl.claims.get(point, "the family's router") for point in ("disabled", "forced", "num_routed")}
        if forced & disabled:
            raise ConfigError(
                f"layer {m.layer_idx}: experts {sorted(forced & disabled)} are always active ({who['forced']}) and "
                f"disabled ({who['disabled']}); choose other experts in one of the two"
            )
        blocked = disabled | (set() if ctl.allow_overlap else forced)
        usable = E - len(blocked)
        if usable < k:
            parts = [f"{len(disabled)} are disabled ({who['disabled']})"] if disabled else []
            if forced and not ctl.allow_overlap:
                parts.append(f"{len(forced)} are always active ({who['forced']})")
            picks = f"top_k={k}" if "num_routed" not in ctl.claims else f"the {k} routed picks per token of {who['num_routed']}"
            raise ConfigError(
                f"layer {m.layer_idx}: of its {E} experts {' and '.join(parts)}, leaving {usable}, fewer than {picks}; "
                "disable fewer experts, or use fewer always-active or routed ones"
            )
        if spec.group_score != "none" and forced and not ctl.allow_overlap:
            # Worst case: every always-active expert sits in the groups a token keeps.
            reachable = spec.topk_group * (E // spec.n_group)
            if reachable - len(forced) < k:
                raise ConfigError(
                    f"layer {m.layer_idx}: {k} routed picks ({who['num_routed']}) cannot avoid {len(forced)} always-active "
                    f"experts ({who['forced']}) among the {reachable} experts a token's {spec.topk_group} groups reach; "
                    "use fewer always-active experts"
                )


def resolve(config, model: nn.Module):
    """`config` resolved for `model`: every method's defaults, then the aux-loss settings
    (the checkpoint's own values unless set; 0 under an aux-loss-free method)."""
    config = resolve_config(config, model.config)
    adapter = get_adapter(model)
    coef, on = config.router_aux_loss_coef, config.output_router_logits
    free = [m.name for m, _ in enabled_methods(config) if m.aux_loss_free]
    if not adapter.has_aux_loss:
        if coef or on:
            raise ConfigError(
                f"router_aux_loss_coef={coef}, output_router_logits={on}: {model.config.model_type} models add no "
                "load-balancing aux loss in transformers (their routers balance by a score bias); leave both unset"
            )
        return config
    if free:
        if coef:
            raise ConfigError(
                f"router_aux_loss_coef = {coef} with {', '.join(free)}: the method is auxiliary-loss free (it balances "
                "or sparsifies with its router bias); drop router_aux_loss_coef or the method"
            )
        coef = 0.0
    if coef is None:
        coef = float(getattr(model.config, "router_aux_loss_coef", 0.0) or 0.0)
    if on is None:
        on = bool(config.router_aux_loss_coef) or bool(getattr(model.config, "output_router_logits", False))
    return dataclasses.replace(config, router_aux_loss_coef=coef, output_router_logits=on)


def _apply_aux_loss(handle: PatchHandle) -> None:
    """The CausalLM multiplies its load-balancing loss by the instance's `router_aux_loss_coef`
    (read from the config at init), and TRL's trainers read the config's: set both."""
    cfg, model = handle.config, handle.model
    if cfg.router_aux_loss_coef is None:
        return
    before = (getattr(model.config, "router_aux_loss_coef", None), getattr(model.config, "output_router_logits", None))
    handle.set_model_config("router_aux_loss_coef", cfg.router_aux_loss_coef)
    handle.set_model_config("output_router_logits", cfg.output_router_logits)
    if hasattr(model, "router_aux_loss_coef"):
        handle.set_model_attr("router_aux_loss_coef", cfg.router_aux_loss_coef)
    if before != (cfg.router_aux_loss_coef, cfg.output_router_logits):
        logger.info(
            "moe_sft: router aux loss coef %s -> %g, output_router_logits %s -> %s (config.json keeps the loaded values)",
            before[0], cfg.router_aux_loss_coef, before[1], cfg.output_router_logits,
        )  # fmt: skip


def _track_usage(handle: PatchHandle) -> None:
    for m in handle.layers:
        handle._usage[m.layer_idx] = ExpertUsage(m.controls.spec.num_experts, m.block.gate.weight.device)
    handle.observe(lambda i, routing, x, block: handle._usage[i].add(routing), training_only=True)


def _install_save(handle: PatchHandle) -> None:
    model = handle.model

    @functools.wraps(type(model).save_pretrained)
    def save_pretrained(save_directory, **kwargs):
        return save_patched(handle, save_directory, **kwargs)

    model.save_pretrained = save_pretrained
    handle.add_undo(lambda: delattr(model, "save_pretrained"))


def patch_model(model: nn.Module, config=None) -> PatchHandle:
    """Patch `model` (a transformers MoE causal LM instance) in place and return its handle.

    Raises PatchError for an unsupported family, an unexpected module layout, or a model that
    is already patched, and ConfigError for a config this model cannot run. `config=None`
    means `MoESFTConfig()`: every method off, stock outputs.
    """
    cls = config_class()
    config = config if config is not None else cls()
    if not isinstance(config, cls):
        raise TypeError(f"config must be a moe_sft.MoESFTConfig, got {type(config).__name__}")
    if get_handle(model) is not None:
        raise PatchError(
            f"{type(model).__name__} is already patched by moe_sft; call handle.revert() before patching again"
        )
    adapter = get_adapter(model)
    config = resolve(config, model)
    check_config(config)
    layers = adapter.decoder_layers(model)
    moe_indices = adapter.moe_layer_indices(model)
    if not moe_indices:
        raise PatchError(
            f"{type(model).__name__}: no `{adapter.block_class_name}` found at `layers[i].mlp` "
            f"(checked {len(layers)} decoder layers)"
        )
    for i in moe_indices:
        adapter.validate_block(layers[i].mlp, f"layers[{i}].mlp", model.config)

    handle = PatchHandle(model, adapter, config)
    prefix = _layers_prefix(model, layers)
    try:
        for i in moe_indices:
            handle.layers.append(_patch_block(handle, i, f"{prefix}{i}.mlp", layers[i].mlp))
        setattr(model, _HANDLE_ATTR, handle)
        apply_routing_config(handle)
        _apply_aux_loss(handle)
        if config.track_usage:
            _track_usage(handle)
        for method, block in enabled_methods(config):
            handle.state[method.name] = method.apply(handle, block)
            logger.info("moe_sft: %s enabled", method.name)
        check_routing_budget(handle)
        handle.refresh_extra_keys()
        _install_save(handle)
        if any(m.needs_step for m, _ in handle.methods()):
            _watch_steps(handle)
    except BaseException:
        while handle._undo:
            handle._undo.pop()()
        if hasattr(model, _HANDLE_ATTR):
            delattr(model, _HANDLE_ATTR)
        raise
    logger.info(
        "moe_sft: patched %d MoE layers of %s (%s); dense layers: %s",
        len(handle.layers),
        type(model).__name__,
        model.config.model_type,
        [i for i in range(len(layers)) if i not in moe_indices] or "none",
    )
    return handle


def extend_patch(handle: PatchHandle, config) -> PatchHandle:
    """Change the blocks of a live patch in place to `config` (resolved for the model): a
    method whose block differs must support it through `Method.extend` (condenser phase 1 ->
    phase 2); blocks cannot appear or disappear, nor core fields change."""
    config = resolve(config, handle.model)
    check_config(config)
    old = handle.config
    core_changed = [f for f in ("track_usage", "routing", "router_aux_loss_coef", "output_router_logits") if getattr(old, f) != getattr(config, f)]
    names = {m.name for m in registered_methods()}
    appear = sorted(n for n in names if (getattr(old, n) is None) != (getattr(config, n) is None))
    if core_changed or appear:
        raise ConfigError(
            f"the model is patched with {old.to_dict()}; {config.to_dict()} changes {core_changed + appear}, which a live "
            "patch cannot take; start from the base checkpoint"
        )
    handle.config = config  # an `extend` may fill in more (e.g. the experts it chose)
    try:
        for method, block in enabled_methods(config):
            before = getattr(old, method.name)
            if block != before:
                handle.state[method.name] = method.extend(handle, handle.state.get(method.name), before, block)
    except BaseException:
        handle.config = old
        raise
    check_routing_budget(handle)
    handle.refresh_extra_keys()
    return handle


def _layers_prefix(model: nn.Module, layers: nn.ModuleList) -> str:
    for name, module in model.named_modules():
        if module is layers:
            return f"{name}."
    return "layers."
