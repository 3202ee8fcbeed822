"""The built-in method plug-ins; importing this package registers them (`moe_sft.plugins`).

The order here is the order methods are applied when several are combined (LoRA last, so
its adapters see every tensor the others added).
"""

from . import condenser, moe_bias_head, frozen_router, densemixer, esft, lora  # noqa: F401
