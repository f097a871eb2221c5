"""RAT model configuration.

RAT ("RAT: Bridging RNN Efficiency and Attention Accuracy in Language Modeling", Wei et al., 2025) cuts the
sequence into chunks of `chunk_size` tokens: inside a chunk a gated linear recurrence summarises keys and values,
across chunks every token runs softmax attention over the summaries of all earlier chunks plus its own running
summary. The paper's five models (attention, rnn, rat, attention-swa, rat-swa) are all layer patterns of this one
model family: see `RatConfig.from_preset`.

This module is a flat sibling of `modeling_rat.py`, which imports it with `from .configuration_rat import`: transformers
copies both next to the weights of every saved checkpoint (`register_for_auto_class`), so that `trust_remote_code=True`
loading works without this package. It imports only the standard library and transformers. The documented import path
is `from configuration_rat import RatConfig` (or `from modeling_rat import RatConfig`).
"""

import math
from numbers import Real

from transformers import PretrainedConfig
from transformers.activations import ACT2FN


RAT_LAYER_TYPES = ("rat", "sliding_attention", "full_attention", "rnn")

# The paper's five models, as layer patterns: a function of the layer index.
PAPER_LAYER_PATTERNS = {
    "attention": lambda layer_idx: "full_attention",
    "rnn": lambda layer_idx: "rnn",
    "rat": lambda layer_idx: "rat",
    "attention-swa": lambda layer_idx: "full_attention" if layer_idx % 2 == 0 else "sliding_attention",
    "rat-swa": lambda layer_idx: "rat" if layer_idx % 2 == 0 else "sliding_attention",
}

# Model sizes. "1.3b" is the paper's main size (Llama-2 tokenizer, 32000 tokens); the others are for experiments.
PRESET_SIZES = {
    "1.3b": dict(hidden_size=2048, num_hidden_layers=24, num_attention_heads=16, vocab_size=32000),
    "760m": dict(hidden_size=1536, num_hidden_layers=24, num_attention_heads=12, vocab_size=32000),
    "200m": dict(hidden_size=1024, num_hidden_layers=12, num_attention_heads=8, vocab_size=32000),
    "small": dict(hidden_size=512, num_hidden_layers=8, num_attention_heads=8, vocab_size=32000),
    "mini": dict(hidden_size=256, num_hidden_layers=4, num_attention_heads=4, vocab_size=8192),
    "tiny": dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, vocab_size=512),
}

# The paper's sliding window: the official `window_size=1024` lets a query see 1024 earlier tokens plus itself.
# `RatConfig.sliding_window` counts the tokens a query sees, itself included, hence 1025.
PAPER_SLIDING_WINDOW = 1025

RAT_IMPLEMENTATIONS = ("auto", "reference", "fast", "triton")

# The Auto classes of RAT models: Auto class name -> class name in `modeling_rat.py`. `import modeling_rat` registers
# every entry with its Auto class, and every saved `config.json` lists every entry in its `auto_map`, so that a new
# task head needs one line here.
RAT_AUTO_CLASSES = {
    "AutoModel": "RatModel",
    "AutoModelForCausalLM": "RatForCausalLM",
    "AutoModelForSequenceClassification": "RatForSequenceClassification",
    "AutoModelForTokenClassification": "RatForTokenClassification",
    "AutoModelForQuestionAnswering": "RatForQuestionAnswering",
}


def rat_auto_map(existing: dict | None = None) -> dict:
    """
    The `auto_map` of a saved RAT checkpoint: `AutoConfig` and every entry of `RAT_AUTO_CLASSES`, pointing at the code
    saved beside `config.json`. Entries of `existing` that also point at files beside it (no `repo--` prefix; e.g. a
    subclass registered with `register_for_auto_class`) are kept; those that point at another Hub repository's code
    (the prefix transformers adds when loading from the Hub) are replaced, since the code is saved beside the weights.
    """
    auto_map = {"AutoConfig": "configuration_rat.RatConfig"}
    auto_map.update({auto_class: f"modeling_rat.{name}" for auto_class, name in RAT_AUTO_CLASSES.items()})
    for auto_class, reference in (existing or {}).items():
        if auto_class not in auto_map or (isinstance(reference, str) and "--" not in reference):
            auto_map[auto_class] = reference
    return auto_map


class RatConfig(PretrainedConfig):
    r"""
    Configuration of a RAT language model ([`RatModel`], [`RatForCausalLM`]). The defaults give the paper's 1.3B
    RAT model (every layer a RAT layer, chunk size 16, two key/query groups).

    Args:
        vocab_size (`int`, defaults to 32000): number of tokens in the vocabulary.
        hidden_size (`int`, defaults to 2048): width D of the residual stream.
        intermediate_size (`int`, *optional*): width of the GELU MLP; defaults to `4 * hidden_size`.
        num_hidden_layers (`int`, *optional*): number of blocks; defaults to the length of `layer_types`, else 24.
        num_attention_heads (`int`, defaults to 16): heads H of the RAT and attention mixers.
        head_dim (`int`, *optional*): derived, `hidden_size // num_attention_heads`; may be given only if equal.
        num_qk_groups (`int`, defaults to 2): key/query groups G of the RAT mixer (the paper's `ngroups`). Queries
            and keys are projected to `G * head_dim` and tiled over the heads: head h uses group `h % G`.
        chunk_size (`int`, defaults to 16): chunk length L of the RAT mixer. L = 1 is close to attention, a chunk as
            long as the sequence is an RNN.
        layer_types (`list[str]`, *optional*): one entry per layer among `"rat"`, `"sliding_attention"`,
            `"full_attention"`, `"rnn"`; defaults to all `"rat"`. Hybrids are layer patterns. Stored in `config.json`
            as `rat_layer_types` (see `to_dict`); `rat_layer_types` is accepted as an argument for that reason.
        sliding_window (`int`, *optional*): number of tokens a sliding-window attention query sees, itself included
            (the Hugging Face convention). The official code's `window_size=W` corresponds to `sliding_window=W + 1`.
            Required when `layer_types` contains `"sliding_attention"`.
        rnn_forget_gate_init_length (`int`, defaults to 2048): the rnn layers' forget-gate bias is initialised as
            `log(U(1, rnn_forget_gate_init_length - 1))`, from the training context length, as in the official code
            (its `max_length`). Nothing else uses it: RAT models have no position limit (rotary angles grow with the
            chunk or token index), so the config has no `max_position_embeddings`, which transformers would take for
            one (it caps and warns about generation lengths). The key `max_position_embeddings` of older config.json
            files is read as this field.
        rope_theta (`float`, defaults to 10000.0): rotary base.
        rms_norm_eps (`float`, defaults to 1e-6): RMSNorm epsilon.
        hidden_act (`str`, defaults to `"gelu"`): MLP activation, a name of transformers' `ACT2FN` (the paper's
            `"gelu"` is the exact erf GELU).
        initializer_range (`float`, defaults to 0.02): standard deviation of the normal initialisation.
        tie_word_embeddings (`bool`, defaults to `True`): tie the LM head to the token embedding.
        use_cache (`bool`, defaults to `True`): return a cache from forward passes that can use one.
        rat_implementation (`str`, defaults to `"auto"`): how RAT layers are computed: `"reference"` (the equations
            written plainly, slow, the ground truth of the tests), `"fast"` (vectorised PyTorch, any device),
            `"triton"` (fused GPU kernels) or `"auto"` (the fastest correct path for the device).
    """

    model_type = "rat"
    keys_to_ignore_at_inference = ["cache", "past_key_values"]

    def __init__(
        self,
        vocab_size: int = 32000,
        hidden_size: int | None = None,
        intermediate_size: int | None = None,
        num_hidden_layers: int | None = None,
        num_attention_heads: int | None = None,
        head_dim: int | None = None,
        num_qk_groups: int = 2,
        chunk_size: int = 16,
        layer_types: list[str] | None = None,
        sliding_window: int | None = None,
        rnn_forget_gate_init_length: int | None = None,
        rope_theta: float = 10000.0,
        rms_norm_eps: float = 1e-6,
        hidden_act: str = "gelu",
        initializer_range: float = 0.02,
        tie_word_embeddings: bool = True,
        use_cache: bool = True,
        pad_token_id: int | None = None,
        bos_token_id: int | None = None,
        eos_token_id: int | list[int] | None = None,
        rat_implementation: str = "auto",
        rat_layer_types: list[str] | None = None,
        **kwargs,
    ):
        rnn_forget_gate_init_length = _renamed_argument(
            "rnn_forget_gate_init_length", rnn_forget_gate_init_length, "max_position_embeddings", kwargs, default=2048
        )
        if rat_layer_types is not None:  # the name `layer_types` is stored under in config.json (see `to_dict`)
            if layer_types is not None and list(layer_types) != list(rat_layer_types):
                raise ValueError(
                    f"`layer_types` ({layer_types}) and `rat_layer_types` ({rat_layer_types}) disagree: they are the same "
                    "field (config.json stores it as `rat_layer_types`); give one of them."
                )
            layer_types = rat_layer_types
        # Which of the fields that `head_dim` derives from took their defaults: a config.json that lacks one of them
        # gets an error naming it rather than `head_dim`.
        defaulted = [name for name, value in (("hidden_size", hidden_size), ("num_attention_heads", num_attention_heads)) if value is None]
        hidden_size = 2048 if hidden_size is None else hidden_size
        num_attention_heads = 16 if num_attention_heads is None else num_attention_heads
        if num_hidden_layers is None:
            num_hidden_layers = len(layer_types) if isinstance(layer_types, (list, tuple)) else 24
        if intermediate_size is None:
            intermediate_size = 4 * hidden_size if isinstance(hidden_size, int) else hidden_size
        if layer_types is None and isinstance(num_hidden_layers, int):
            layer_types = ["rat"] * num_hidden_layers
        self.vocab_size = vocab_size
        self.hidden_size = hidden_size
        self.intermediate_size = intermediate_size
        self.num_hidden_layers = num_hidden_layers
        self.num_attention_heads = num_attention_heads
        self.num_qk_groups = num_qk_groups
        self.chunk_size = chunk_size
        self.sliding_window = sliding_window
        self.rnn_forget_gate_init_length = rnn_forget_gate_init_length
        self.rope_theta = rope_theta
        self.rms_norm_eps = rms_norm_eps
        self.hidden_act = hidden_act
        self.initializer_range = initializer_range
        self.use_cache = use_cache
        self.rat_implementation = rat_implementation
        # transformers' base-class validation (run by its `__init__`) knows only its own layer types, so
        # `layer_types` is set after it and checked with RAT's own rules (`validate` below).
        self.layer_types = None
        super().__init__(
            pad_token_id=pad_token_id,
            bos_token_id=bos_token_id,
            eos_token_id=eos_token_id,
            tie_word_embeddings=tie_word_embeddings,
            **kwargs,
        )
        self.layer_types = list(layer_types) if isinstance(layer_types, (list, tuple)) else layer_types
        self._check_rat_arguments(head_dim, defaulted)
        self.head_dim = hidden_size // num_attention_heads

    # ------------------------------------------------------------------------------------------------ validation

    def _check_rat_arguments(self, head_dim, defaulted=()):
        """
        Raise a ValueError that says what to change for any invalid combination of arguments. `defaulted`: the fields
        `head_dim` derives from that were not given (a config.json lacking them), named when `head_dim` disagrees.
        """
        for name in ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
                     "num_qk_groups", "rnn_forget_gate_init_length"):
            value = getattr(self, name)
            if not _is_integer(value) or value < 1:
                raise ValueError(f"`{name}` must be a positive integer, got {value!r}.")
        if not _is_integer(self.chunk_size) or self.chunk_size < 1:
            raise ValueError(
                f"`chunk_size` must be an integer >= 1, got {self.chunk_size!r}. Use 1 for attention-like layers and "
                "the paper's 16 for RAT."
            )
        if self.hidden_size % self.num_attention_heads != 0:
            raise ValueError(
                f"`hidden_size` ({self.hidden_size}) must be divisible by `num_attention_heads` "
                f"({self.num_attention_heads}): choose a head count that divides it, e.g. "
                f"{_divisors_near(self.hidden_size, self.num_attention_heads)}."
            )
        if self.num_attention_heads % self.num_qk_groups != 0:
            raise ValueError(
                f"`num_attention_heads` ({self.num_attention_heads}) must be divisible by `num_qk_groups` "
                f"({self.num_qk_groups}): queries and keys of each group are tiled over the heads. Choose "
                f"`num_qk_groups` among {[g for g in range(1, self.num_attention_heads + 1) if self.num_attention_heads % g == 0]}."
            )
        derived_head_dim = self.hidden_size // self.num_attention_heads
        if head_dim is not None and head_dim != derived_head_dim:
            if defaulted:
                missing = " and ".join(f"`{name}`" for name in defaulted)
                raise ValueError(
                    f"{missing} not given, so the default hidden_size {self.hidden_size} and num_attention_heads "
                    f"{self.num_attention_heads} give head size {derived_head_dim}, but `head_dim` is {head_dim}: set "
                    f"{missing} (a config.json must state hidden_size and num_attention_heads)."
                )
            raise ValueError(
                f"`head_dim` is derived as hidden_size // num_attention_heads = {derived_head_dim}, but {head_dim} was "
                "given: leave `head_dim` unset or change `hidden_size`/`num_attention_heads`."
            )
        if derived_head_dim % 2 != 0:
            raise ValueError(
                f"The head size hidden_size // num_attention_heads = {derived_head_dim} must be even for rotary "
                "embeddings: change `hidden_size` or `num_attention_heads`."
            )
        if not isinstance(self.layer_types, list) or len(self.layer_types) != self.num_hidden_layers:
            length = len(self.layer_types) if isinstance(self.layer_types, list) else self.layer_types
            raise ValueError(
                f"`layer_types` must have one entry per layer: got {length} entries for num_hidden_layers="
                f"{self.num_hidden_layers}. Give a list of length {self.num_hidden_layers} or leave it unset (all 'rat')."
            )
        unknown = sorted({t for t in self.layer_types if t not in RAT_LAYER_TYPES}, key=str)
        if unknown:
            raise ValueError(f"Unknown layer type(s) {unknown} in `layer_types`: each entry must be one of {RAT_LAYER_TYPES}.")
        if self.sliding_window is not None and (not _is_integer(self.sliding_window) or self.sliding_window < 1):
            raise ValueError(f"`sliding_window` must be a positive integer (tokens a query sees), got {self.sliding_window!r}.")
        if "sliding_attention" in self.layer_types and self.sliding_window is None:
            raise ValueError(
                "`layer_types` contains 'sliding_attention' but `sliding_window` is not set: give the number of tokens "
                f"a query sees, itself included (the paper uses {PAPER_SLIDING_WINDOW}, official window_size=1024)."
            )
        for name, lowest, inclusive in (("rope_theta", 0, False), ("rms_norm_eps", 0, False), ("initializer_range", 0, True)):
            value = getattr(self, name)
            if not _is_real(value) or not math.isfinite(value) or value < lowest or (value == lowest and not inclusive):
                bound = f">= {lowest}" if inclusive else f"> {lowest}"
                raise ValueError(f"`{name}` must be a finite number {bound}, got {value!r}.")
        if not isinstance(self.hidden_act, str) or self.hidden_act not in ACT2FN:
            raise ValueError(
                f"`hidden_act` {self.hidden_act!r} is not an activation transformers knows: use one of {sorted(ACT2FN)} "
                "(the paper's is 'gelu')."
            )
        # transformers only warns about special tokens outside the vocabulary; here they would fail later, deep inside
        # the embedding (pad_token_id) or generate() (bos/eos), so they are refused.
        for name in ("pad_token_id", "bos_token_id", "eos_token_id"):
            value = getattr(self, name, None)
            token_ids = list(value) if isinstance(value, (list, tuple)) else [value]
            if value is not None and not all(_is_integer(t) and 0 <= t < self.vocab_size for t in token_ids):
                raise ValueError(
                    f"`{name}` must be None or a token id in [0, {self.vocab_size}) (vocab_size {self.vocab_size}), got "
                    f"{value!r}: give an id of the tokenizer's vocabulary, or raise `vocab_size`."
                )
        if self.rat_implementation not in RAT_IMPLEMENTATIONS:
            raise ValueError(f"`rat_implementation` must be one of {RAT_IMPLEMENTATIONS}, got {self.rat_implementation!r}.")

    def validate(self):
        """Check the configuration (transformers calls this before saving): RAT's rules, then transformers' own
        checks except its layer-type check, which knows only transformers' attention types."""
        self._check_rat_arguments(self.head_dim)
        for validator in getattr(PretrainedConfig, "__class_validators__", ()):
            if validator.__name__ != "validate_layer_type":
                validator(self)

    def to_dict(self) -> dict:
        """
        The configuration as a dictionary, as written to `config.json`. `layer_types` is stored under the key
        `rat_layer_types`: transformers reads `config.json` with its generic configuration class in some places (the
        Trainer when resuming from a checkpoint, tokenizer loading without `trust_remote_code`), and that class refuses
        layer types it does not know ("rat", "rnn"). `RatConfig` reads both keys.
        """
        output = super().to_dict()
        if "layer_types" in output:
            output["rat_layer_types"] = output.pop("layer_types")
        return output

    def save_pretrained(self, save_directory, push_to_hub: bool = False, **kwargs):
        """
        `PretrainedConfig.save_pretrained`, with an `auto_map` that lists every RAT Auto class (see `rat_auto_map`).
        transformers' `custom_object_save` copies this file beside `config.json`; saving the model
        (`model.save_pretrained`) also copies the model's code, so that the folder loads with `trust_remote_code=True`.
        """
        if type(self)._auto_class is None:  # e.g. the class of a remote-code model file, imported without AutoConfig
            type(self).register_for_auto_class()
        self.auto_map = rat_auto_map(getattr(self, "auto_map", None))
        super().save_pretrained(save_directory, push_to_hub=push_to_hub, **kwargs)

    # --------------------------------------------------------------------------------------------------- presets

    @classmethod
    def from_preset(cls, model: str = "rat", size: str = "1.3b", **overrides) -> "RatConfig":
        """
        One of the paper's five models at a preset size.

        Args:
            model: `"attention"`, `"rnn"`, `"rat"`, `"attention-swa"` or `"rat-swa"` (hybrids alternate: layer i is
                attention/rat when i is even and sliding-window attention when odd).
            size: one of `PRESET_SIZES` (`"1.3b"` is the paper's main size).
            overrides: any `RatConfig` argument, e.g. `vocab_size=len(tokenizer)`.
        """
        if model not in PAPER_LAYER_PATTERNS:
            raise ValueError(f"Unknown model {model!r}: choose one of {list(PAPER_LAYER_PATTERNS)}.")
        if size not in PRESET_SIZES:
            raise ValueError(f"Unknown size {size!r}: choose one of {list(PRESET_SIZES)}.")
        arguments = dict(PRESET_SIZES[size], chunk_size=16, num_qk_groups=2)
        if model.endswith("-swa"):
            arguments["sliding_window"] = PAPER_SLIDING_WINDOW
        arguments.update(overrides)
        if "layer_types" not in overrides:
            pattern = PAPER_LAYER_PATTERNS[model]
            arguments["layer_types"] = [pattern(i) for i in range(arguments["num_hidden_layers"])]
        return cls(**arguments)

def _renamed_argument(name: str, value, old_name: str, kwargs: dict, default):
    """The value of argument `name`, also accepted under its former name `old_name` (popped from `kwargs`)."""
    old_value = kwargs.pop(old_name, None)
    if old_value is not None and value is not None and old_value != value:
        raise ValueError(
            f"`{name}` ({value}) and `{old_name}` ({old_value}) disagree: `{old_name}` is the former name of `{name}`; "
            f"give one of them."
        )
    for candidate in (value, old_value):
        if candidate is not None:
            return candidate
    return default


def _is_integer(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_real(value) -> bool:
    return isinstance(value, Real) and not isinstance(value, bool)


def _divisors_near(number: int, target: int) -> list[int]:
    divisors = [d for d in range(1, number + 1) if number % d == 0]
    return sorted(divisors, key=lambda d: abs(d - target))[:3]


