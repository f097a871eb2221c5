"""RAT models for Hugging Face Transformers.

Importing this package registers RAT with the Auto classes: `AutoConfig` and every entry of `RAT_AUTO_CLASSES`
(`AutoModel`, `AutoModelForCausalLM`, ...), so that saved RAT checkpoints load with the Auto classes without
`trust_remote_code`. It also registers each class for its Auto class (`register_for_auto_class`), so that every
`save_pretrained` copies the model's code beside the weights (transformers' `custom_object_save`) and the folder loads
with `trust_remote_code=True` where this package is not installed.
"""

import transformers

from . import modeling_rat
from .cache_rat import cache_nbytes
from .configuration_rat import RAT_AUTO_CLASSES, RatConfig
from .modeling_rat import (
    RatForCausalLM,
    RatForQuestionAnswering,
    RatForSequenceClassification,
    RatForTokenClassification,
    RatModel,
    RatPreTrainedModel,
)


def _register_auto_classes():
    transformers.AutoConfig.register("rat", RatConfig, exist_ok=True)
    RatConfig.register_for_auto_class("AutoConfig")
    for auto_class_name, class_name in RAT_AUTO_CLASSES.items():
        model_class = getattr(modeling_rat, class_name)
        getattr(transformers, auto_class_name).register(RatConfig, model_class, exist_ok=True)
        model_class.register_for_auto_class(auto_class_name)


_register_auto_classes()

__all__ = [
    "RatConfig",
    "RatModel",
    "RatForCausalLM",
    "RatForSequenceClassification",
    "RatForTokenClassification",
    "RatForQuestionAnswering",
    "RatPreTrainedModel",
    "RAT_AUTO_CLASSES",
    "cache_nbytes",
]
