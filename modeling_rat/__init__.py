"""RAT models for Hugging Face Transformers.

Importing this package registers `"rat"` with `AutoConfig`, `AutoModel` and `AutoModelForCausalLM`, so that saved
RAT checkpoints load with the Auto classes without `trust_remote_code`.
"""

from transformers import AutoConfig, AutoModel, AutoModelForCausalLM

from configuration_rat import RatConfig

from .cache_rat import cache_nbytes
from .modeling_rat import RatForCausalLM, RatModel, RatPreTrainedModel


AutoConfig.register("rat", RatConfig, exist_ok=True)
AutoModel.register(RatConfig, RatModel, exist_ok=True)
AutoModelForCausalLM.register(RatConfig, RatForCausalLM, exist_ok=True)

__all__ = ["RatConfig", "RatModel", "RatForCausalLM", "RatPreTrainedModel", "cache_nbytes"]
