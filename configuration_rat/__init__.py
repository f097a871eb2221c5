"""`RatConfig`, the configuration of RAT models. Importing this package registers `"rat"` with `AutoConfig`."""

from transformers import AutoConfig

from .configuration_rat import PAPER_LAYER_PATTERNS, PRESET_SIZES, RAT_LAYER_TYPES, RatConfig


AutoConfig.register("rat", RatConfig, exist_ok=True)

__all__ = ["RatConfig", "PRESET_SIZES", "PAPER_LAYER_PATTERNS", "RAT_LAYER_TYPES"]
