"""Family adapters, one module per model family, registered by `config.model_type`.

Installed as `moe_sft.patches`. Importing this package only fills the registry in
`moe_sft.adapters`; no model is touched until `moe_sft.patch_model` is called.
"""

from . import deepseek_v2, deepseek_v3, glm4_moe, mixtral, olmoe, qwen2_moe, qwen3_moe, qwen3_next  # noqa: F401
