"""RAT model configuration.

RAT ("RAT: Bridging RNN Efficiency and Attention Accuracy in Language Modeling", Wei et al., 2025) cuts the
sequence into chunks of `chunk_size` tokens: inside a chunk a gated linear recurrence summarises keys and values,
across chunks every token runs softmax attention over the summaries of all earlier chunks plus its own running
summary. The paper's five models (attention, rnn, rat, attention-swa, rat-swa) are all layer patterns of this one
model family: see `RatConfig.from_preset`.

This file is self-contained (it imports only the standard library and transformers) because it is copied next to
the weights of every saved checkpoint, so that `trust_remote_code=True` loading works without this package.
"""

import ast
import importlib.util
import os
import re
import shutil
from contextlib import contextmanager
from contextvars import ContextVar
from pathlib import Path

from transformers import PretrainedConfig
from transformers.dynamic_module_utils import get_relative_imports
from transformers.utils import logging


logger = logging.get_logger(__name__)


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

AUTO_MAP = {
    "AutoConfig": "configuration_rat.RatConfig",
    "AutoModel": "modeling_rat.RatModel",
    "AutoModelForCausalLM": "modeling_rat.RatForCausalLM",
}


class RatConfig(PretrainedConfig):
    r"""
    Configuration of a RAT language model ([`RatModel`], [`RatForCausalLM`]). The defaults give the paper's 1.3B
    RAT model (every layer a RAT layer, chunk size 16, two key/query groups).

    Args:
        vocab_size (`int`, defaults to 32000): number of tokens in the vocabulary.
        hidden_size (`int`, defaults to 2048): width D of the residual stream.
        intermediate_size (`int`, *optional*): width of the GELU MLP; defaults to `4 * hidden_size`.
        num_hidden_layers (`int`, defaults to 24): number of blocks.
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
        max_position_embeddings (`int`, defaults to 2048): training context length. Rotary embeddings do not limit
            the length; this value sets the rnn layers' forget-gate initialisation, `log(U(1, max_position_embeddings
            - 1))`, as in the official code.
        rope_theta (`float`, defaults to 10000.0): rotary base.
        rms_norm_eps (`float`, defaults to 1e-6): RMSNorm epsilon.
        hidden_act (`str`, defaults to `"gelu"`): MLP activation (exact erf GELU in the paper).
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
        hidden_size: int = 2048,
        intermediate_size: int | None = None,
        num_hidden_layers: int = 24,
        num_attention_heads: int = 16,
        head_dim: int | None = None,
        num_qk_groups: int = 2,
        chunk_size: int = 16,
        layer_types: list[str] | None = None,
        sliding_window: int | None = None,
        max_position_embeddings: int = 2048,
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
        if rat_layer_types is not None:  # the name `layer_types` is stored under in config.json (see `to_dict`)
            if layer_types is not None and list(layer_types) != list(rat_layer_types):
                raise ValueError(
                    f"`layer_types` ({layer_types}) and `rat_layer_types` ({rat_layer_types}) disagree: they are the same "
                    "field (config.json stores it as `rat_layer_types`); give one of them."
                )
            layer_types = rat_layer_types
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
        self.max_position_embeddings = max_position_embeddings
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
        self._check_rat_arguments(head_dim)
        self.head_dim = hidden_size // num_attention_heads

    # ------------------------------------------------------------------------------------------------ validation

    def _check_rat_arguments(self, head_dim):
        """Raise a ValueError that says what to change for any invalid combination of arguments."""
        for name in ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
                     "num_qk_groups", "max_position_embeddings"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ValueError(f"`{name}` must be a positive integer, got {value!r}.")
        if not isinstance(self.chunk_size, int) or isinstance(self.chunk_size, bool) or self.chunk_size < 1:
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
        if self.sliding_window is not None and (
            not isinstance(self.sliding_window, int) or isinstance(self.sliding_window, bool) or self.sliding_window < 1
        ):
            raise ValueError(f"`sliding_window` must be a positive integer (tokens a query sees), got {self.sliding_window!r}.")
        if "sliding_attention" in self.layer_types and self.sliding_window is None:
            raise ValueError(
                "`layer_types` contains 'sliding_attention' but `sliding_window` is not set: give the number of tokens "
                f"a query sees, itself included (the paper uses {PAPER_SLIDING_WINDOW}, official window_size=1024)."
            )
        if not (self.rope_theta > 0):
            raise ValueError(f"`rope_theta` must be positive, got {self.rope_theta!r}.")
        if not (self.rms_norm_eps > 0):
            raise ValueError(f"`rms_norm_eps` must be positive, got {self.rms_norm_eps!r}.")
        if not (self.initializer_range >= 0):
            raise ValueError(f"`initializer_range` must be >= 0, got {self.initializer_range!r}.")
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

    # ------------------------------------------------------------------------------------------- remote code

    def save_pretrained(self, save_directory, push_to_hub: bool = False, **kwargs):
        """
        Save `config.json` with an `auto_map`, and next to it the model's code (see `remote_code_files`), so that the
        folder (or a Hub repo made from it) loads with `AutoModelForCausalLM.from_pretrained(..., trust_remote_code=True)`
        on a machine without this package.
        """
        if os.path.isfile(save_directory):
            raise ValueError(f"`save_directory` ({save_directory}) must be a directory, not a file.")
        self.auto_map = dict(AUTO_MAP)
        super().save_pretrained(save_directory, push_to_hub=False)
        try:
            written = write_remote_code(save_directory)
        except RemoteCodeNotFoundError as error:
            # A configuration loaded on its own with `trust_remote_code` from a local folder: transformers keeps its
            # file apart from the model's files, so only the configuration's code is at hand.
            destination = Path(save_directory) / "configuration_rat.py"
            if destination.resolve() != Path(__file__).resolve():
                shutil.copyfile(Path(__file__).resolve(), destination)
            written = [destination]
            logger.warning(
                f"Saved the configuration to {save_directory}, but not the model code beside it: {error} Save the model "
                "itself (`model.save_pretrained`) to write a folder that loads with `trust_remote_code=True`."
            )
        if push_to_hub:
            from huggingface_hub import create_repo, upload_folder

            repo_id = kwargs.pop("repo_id", str(save_directory).rstrip(os.sep).split(os.sep)[-1])
            commit_message = kwargs.pop("commit_message", "Upload RAT config")
            token = kwargs.pop("token", None)
            repo_id = create_repo(repo_id, exist_ok=True, token=token, private=kwargs.pop("private", None)).repo_id
            upload_folder(
                repo_id=repo_id,
                folder_path=save_directory,
                allow_patterns=["config.json"] + [path.name for path in written],
                commit_message=commit_message,
                token=token,
            )


def _divisors_near(number: int, target: int) -> list[int]:
    divisors = [d for d in range(1, number + 1) if number % d == 0]
    return sorted(divisors, key=lambda d: abs(d - target))[:3]


class RemoteCodeNotFoundError(FileNotFoundError):
    """The model code to bundle (`modeling_rat.py` and the modules it imports) cannot be found."""


# While a model is being saved, the folder its own code was loaded from (see `bundle_code_from`).
_MODEL_CODE_DIRECTORY: ContextVar[Path | None] = ContextVar("rat_model_code_directory", default=None)


@contextmanager
def bundle_code_from(directory):
    """
    While active, `RatConfig.save_pretrained` bundles the model code found in `directory`. `RatPreTrainedModel.
    save_pretrained` uses it so that a saved model always carries the very code it runs, even when that code was
    itself loaded with `trust_remote_code` (transformers then keeps the configuration's file and the model's files in
    different folders of its module cache).
    """
    token = _MODEL_CODE_DIRECTORY.set(Path(directory).resolve())
    try:
        yield
    finally:
        _MODEL_CODE_DIRECTORY.reset(token)


def _default_model_code_directory() -> Path | None:
    """The folder holding `modeling_rat.py`: beside this file (a remote-code folder) or the installed package."""
    here = Path(__file__).resolve().parent
    if (here / "modeling_rat.py").is_file():
        return here
    try:
        spec = importlib.util.find_spec("modeling_rat")
    except (ImportError, ValueError):  # not installed, or made unimportable
        return None
    if spec is None or spec.origin is None or not spec.submodule_search_locations:
        return None
    return Path(spec.origin).resolve().parent


def _bundled_imports(source: Path) -> list[str]:
    """
    The sibling modules `source` imports, as transformers' remote-code loader finds them (`from .name import ...`,
    wherever it appears, even inside `try:`). The loader only handles flat sibling files, so any other relative import
    is an error here rather than a folder that fails to load on someone else's machine.
    """
    tree = ast.parse(source.read_text(encoding="utf-8"), filename=str(source))
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and node.level > 0:
            if node.level > 1 or node.module is None or "." in node.module:
                written = "." * node.level + (node.module or "")
                raise ValueError(
                    f"{source.name} line {node.lineno}: `from {written} import ...` cannot be bundled as remote code: "
                    "transformers only follows `from .module import name` with `module.py` a sibling file."
                )
    names = get_relative_imports(source)
    for name in names:
        if not re.fullmatch(r"\w+", name):
            raise ValueError(f"{source.name} imports `.{name}`: only flat sibling modules can be bundled as remote code.")
    return sorted(names)


def remote_code_files(modeling_dir=None) -> dict[str, Path]:
    """
    The files of the remote-code bundle, name -> source path: `configuration_rat.py`, `modeling_rat.py` and every
    sibling module they import, recursively (optional ones such as kernels included: their imports are guarded, the
    files must still be present for transformers' loader).

    The files are always taken from code that exists, never from a kept copy: `modeling_dir` when given, else the
    folder of the model being saved (`bundle_code_from`), else this file's own folder when it is a remote-code folder,
    else the installed `modeling_rat` package. `configuration_rat.py` comes from the same folder when it is there (a
    flat remote-code folder), else from this file (the installed `configuration_rat` package).
    """
    if modeling_dir is None:
        modeling_dir = _MODEL_CODE_DIRECTORY.get() or _default_model_code_directory()
    if modeling_dir is None:
        raise RemoteCodeNotFoundError(
            f"`modeling_rat.py` is neither beside {Path(__file__).resolve()} nor installed (pip install rat-transformers)."
        )
    modeling_dir = Path(modeling_dir).resolve()
    files: dict[str, Path] = {}
    pending = ["modeling_rat", "configuration_rat"]
    while pending:
        name = pending.pop()
        if f"{name}.py" in files:
            continue
        source = modeling_dir / f"{name}.py"
        if not source.is_file() and name == "configuration_rat":
            source = Path(__file__).resolve()
        if not source.is_file():
            raise RemoteCodeNotFoundError(
                f"The model code in {modeling_dir} needs `{name}.py` (imported as `.{name}`), which does not exist there."
            )
        files[f"{name}.py"] = source
        pending.extend(_bundled_imports(source))
    return dict(sorted(files.items()))


def write_remote_code(save_directory, modeling_dir=None) -> list[Path]:
    """Copy the remote-code bundle (see `remote_code_files`) into `save_directory`; returns the written paths."""
    files = remote_code_files(modeling_dir)  # resolve everything before writing anything
    save_directory = Path(save_directory)
    save_directory.mkdir(parents=True, exist_ok=True)
    written = []
    for name, source in files.items():
        destination = save_directory / name
        if destination.resolve() != source:
            shutil.copyfile(source, destination)
        written.append(destination)
    return written


__all__ = [
    "RatConfig",
    "PRESET_SIZES",
    "PAPER_LAYER_PATTERNS",
    "RAT_LAYER_TYPES",
    "RemoteCodeNotFoundError",
    "bundle_code_from",
    "remote_code_files",
    "write_remote_code",
]
