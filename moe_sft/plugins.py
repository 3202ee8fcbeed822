"""Method plug-ins: the `Method` base class, its lifecycle hooks and the registry.

A method is one config block plus one `Method` subclass, registered once:

    class DenseMixer(Method):
        name = "densemixer"                 # the block's key in YAML / MoESFTConfig
        config_class = DenseMixerConfig     # the block's typed dataclass
        exports = ("DenseMixerConfig",)     # names re-exported as moe_sft.<name>
        def apply(self, handle, block): ...

    register_method(DenseMixer())

That one registration fills every table: the `MoESFTConfig` field (built from the registry,
see `moe_sft.config.config_class`), the config type YAML is validated against, and the
package exports. The built-in methods live in `moe_sft.methods` (imported here by name when
the registry is first read); third-party packages add theirs through the `moe_sft.methods`
entry-point group. The core (adapters, routing, forward, patching, config, checkpoint) never
imports a method module; it calls the hooks below, in this order:

    resolve(block, model_config) -> block   every default filled in, once (the saved config)
    check(config, launch)                   conflicts with other blocks and with the launch
                                            (DeepSpeed stage, PEFT, ...); before any weight loads
    prepare(block, model, ctx) -> block     before patching, model loaded (ESFT profiling)
    apply(handle, block) -> state           install; the state lands in handle.state[name]
    extend(handle, state, old, new) -> state  change an installed block in place (condenser
                                            phase 1 -> phase 2); default: refused
    wrap(model, handle, state) -> model     after patching (LoRA: the PEFT wrapper)
    on_train_begin(handle, state)           training starts (or resumes)
    on_step(handle, state)                  once per optimizer step, after optimizer.step()
    metrics(handle, state) -> dict          extra values for the training log

After every `apply`, `patch_model` checks the routing budget of every layer (enough usable
experts for the routed picks and the always-active ones) once, whatever combination set it.
"""

from __future__ import annotations

import dataclasses
import importlib
import logging
from typing import Any, ClassVar

from .errors import ConfigError

logger = logging.getLogger(__name__)

BUILTIN_PACKAGE = "moe_sft.methods"
ENTRY_POINT_GROUP = "moe_sft.methods"


@dataclasses.dataclass(frozen=True)
class Launch:
    """How a job is launched, as far as methods care (for `Method.check`).

    zero_stage         DeepSpeed ZeRO stage (0: no DeepSpeed)
    offload_optimizer  ZeRO optimizer states on the CPU / NVMe
    offload_param      ZeRO-3 parameters on the CPU / NVMe
    world_size         data-parallel processes
    weight_decay       the optimizer's weight decay
    trainer            "transformers" (moe-sft train, HF Trainer, TRL SFT) or "grpo"
    expert_parallel    experts split over this many ranks (1: none)
    """

    zero_stage: int = 0
    offload_optimizer: bool = False
    offload_param: bool = False
    world_size: int = 1
    weight_decay: float = 0.0
    trainer: str = "transformers"
    expert_parallel: int = 1

    @property
    def deepspeed(self) -> bool:
        return self.zero_stage > 0


@dataclasses.dataclass
class PrepareContext:
    """What `Method.prepare` may use before patching.

    batches     callable -> list of {"input_ids", "attention_mask"} batches: a seeded sample of
                the training data (profiling passes)
    output_dir  where a method may write what it computed (e.g. the ESFT selection)
    resuming    the run continues from a checkpoint of the same output_dir
    """

    batches: Any = None
    output_dir: Any = None
    resuming: bool = False


class Method:
    """Base class of a method plug-in; override the hooks the method needs."""

    name: ClassVar[str] = ""
    config_class: ClassVar[type | None] = None
    exports: ClassVar[tuple[str, ...]] = ()
    # The family's load-balancing aux loss must stay off while the method is on (it balances
    # or sparsifies by other means); patching sets its coefficient to 0 and refuses a non-zero one.
    aux_loss_free: ClassVar[bool] = False

    # ---- before patching ---------------------------------------------------------------
    def resolve(self, block, model_config):
        """`block` (None when the config has none) with every default resolved for this model
        (family defaults, environment overrides); the result is what runs and what checkpoints
        save. It must be idempotent: a saved config resolves to itself."""
        return block

    def check(self, config, launch: Launch | None) -> None:
        """Refuse a combination with another block of `config`, or with `launch` (None when
        patching outside a launcher). Raise moe_sft.ConfigError naming both sides."""

    def prepare(self, block, model, ctx: PrepareContext):
        """Work on the loaded, not yet patched model that the block needs first."""
        return block

    # ---- patching ----------------------------------------------------------------------
    def apply(self, handle, block) -> Any:
        """Install the method into the patched model; return its state (or None)."""
        raise NotImplementedError(f"method {self.name!r} does not implement apply()")

    def extend(self, handle, state, old_block, new_block) -> Any:
        """Turn the installed `old_block` into `new_block` in place; return the new state."""
        raise ConfigError(
            f"{self.name}: a model patched with {old_block} cannot be changed to {new_block}; start from the base "
            "checkpoint, or leave the block out to continue with the saved one"
        )

    def wrap(self, model, handle, state):
        """The model to train (e.g. a PEFT wrapper around the patched model)."""
        return model

    # ---- training ----------------------------------------------------------------------
    def on_train_begin(self, handle, state) -> None:
        """Training starts or resumes (forwards made before it are not training steps)."""

    def on_step(self, handle, state) -> None:
        """Once per optimizer step, after `optimizer.step()`, on every rank."""

    def metrics(self, handle, state) -> dict[str, float]:
        """Extra values for the training log (collective-free)."""
        return {}

    @property
    def needs_step(self) -> bool:
        """Whether the method has per-optimizer-step work (someone must call `on_step`)."""
        return type(self).on_step is not Method.on_step

    def __repr__(self) -> str:
        return f"<moe_sft method {self.name!r}>"


_METHODS: dict[str, Method] = {}
_state = {"discovered": False, "config_built": False}


def register_method(method: Method) -> Method:
    """Register a method plug-in (at import of its module)."""
    if not isinstance(method, Method):
        raise TypeError(f"register_method takes a moe_sft.plugins.Method instance, got {type(method).__name__}")
    if not method.name or method.config_class is None:
        raise TypeError(f"{type(method).__name__}: set `name` and `config_class`")
    if method.name in _METHODS:
        raise RuntimeError(f"method {method.name!r} registered twice")
    if _state["config_built"]:
        raise RuntimeError(
            f"method {method.name!r} registered after MoESFTConfig was built; register plug-ins through the "
            f"{ENTRY_POINT_GROUP!r} entry-point group so they load with the built-in ones"
        )
    _METHODS[method.name] = method
    return method


def _discover() -> None:
    if _state["discovered"]:
        return
    _state["discovered"] = True
    importlib.import_module(BUILTIN_PACKAGE)  # each module registers its method
    from importlib.metadata import entry_points

    for ep in entry_points(group=ENTRY_POINT_GROUP):
        logger.debug("moe_sft: loading method plug-in %s = %s", ep.name, ep.value)
        ep.load()


def registered_methods() -> list[Method]:
    """Every registered method, in registration order (the order they are applied)."""
    _discover()
    return list(_METHODS.values())


def get_method(name: str) -> Method:
    _discover()
    if name not in _METHODS:
        raise KeyError(f"no method registered for config block {name!r}; known: {sorted(_METHODS)}")
    return _METHODS[name]


def mark_config_built() -> None:
    _state["config_built"] = True


def find_export(name: str) -> Any:
    """The object a method exports as `moe_sft.<name>`; AttributeError if none does."""
    for method in registered_methods():
        if name in method.exports:
            module = importlib.import_module(type(method).__module__)
            return getattr(module, name)
    raise AttributeError(name)


def all_exports() -> list[str]:
    return sorted(name for method in registered_methods() for name in method.exports)


# ---- the config as a whole ---------------------------------------------------------------
def enabled_methods(config) -> list[tuple[Method, Any]]:
    """(method, its block) for every method block of `config` that is set, in registration order."""
    return [(m, getattr(config, m.name)) for m in registered_methods() if getattr(config, m.name, None) is not None]


def resolve_config(config, model_config):
    """`config` with every method's defaults resolved for `model_config` (a method may also
    turn itself on or off here, e.g. from environment variables)."""
    changes = {m.name: m.resolve(getattr(config, m.name), model_config) for m in registered_methods()}
    return dataclasses.replace(config, **changes)


def check_config(config, launch: Launch | None = None) -> None:
    """Every enabled method's `check` (combinations, and the launch when given)."""
    for method, _block in enabled_methods(config):
        method.check(config, launch)
