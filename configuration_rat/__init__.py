"""
`RatConfig`, the configuration of RAT models: `from configuration_rat import RatConfig`.

The class is defined in `modeling_rat/configuration_rat.py`, a flat sibling of the model's code, so that transformers
saves both beside the weights of every checkpoint; this package is the import path for the configuration alone.
Importing it registers `"rat"` with the Auto classes (see `modeling_rat`).
"""

from modeling_rat.configuration_rat import PAPER_LAYER_PATTERNS, PRESET_SIZES, RAT_AUTO_CLASSES, RAT_LAYER_TYPES, RatConfig


__all__ = ["RatConfig", "PRESET_SIZES", "PAPER_LAYER_PATTERNS", "RAT_LAYER_TYPES", "RAT_AUTO_CLASSES"]
