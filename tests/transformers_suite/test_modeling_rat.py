"""
transformers' common model and generation tests (`ModelTesterMixin`, `GenerationTesterMixin`, `ConfigTester`) on
RAT, written like transformers' tests of its hybrid models: a tester building tiny configurations and inputs, and
one test class per layer pattern (pure rat, pure rnn, rat with sliding-window attention, rat with full attention).

The mixins are transformers' code, imported from the folder named by TRANSFORMERS_TESTS_DIR (see conftest.py and
`scripts/run_transformers_suite.sh`). Tests are skipped here only where they cannot apply to RAT; each skip says why.
"""

import unittest
from contextlib import contextmanager
from unittest import mock

import torch
from transformers.cache_utils import Cache
from transformers.models.auto import modeling_auto
from transformers.testing_utils import require_torch, torch_device

from modeling_rat import RatConfig, RatForCausalLM, RatModel
from modeling_rat.cache_rat import RatChunkCacheLayer, RatRecurrentCacheLayer
from tests.generation.test_utils import GenerationTesterMixin
from tests.test_configuration_common import ConfigTester
from tests.test_modeling_common import ModelTesterMixin, ids_tensor


class RatModelTester:
    """Tiny RAT configurations and inputs for transformers' mixins (their attribute names are the mixins' API)."""

    base_model_class = RatModel

    def __init__(
        self,
        parent,
        layer_types=("rat", "rat"),
        batch_size=13,
        seq_length=7,
        is_training=True,
        use_input_mask=True,
        use_labels=True,
        vocab_size=99,
        hidden_size=32,
        intermediate_size=37,
        num_attention_heads=4,
        num_qk_groups=2,
        chunk_size=4,  # the 7-token prompts end inside their second chunk; generation crosses a chunk boundary
        sliding_window=4,  # shorter than the prompts, so that the window matters
        rnn_forget_gate_init_length=512,
        initializer_range=0.02,
        pad_token_id=0,
        bos_token_id=1,
        eos_token_id=2,
    ):
        self.parent = parent
        self.layer_types = list(layer_types)
        self.num_hidden_layers = len(self.layer_types)
        self.batch_size = batch_size
        self.seq_length = seq_length
        self.is_training = is_training
        self.use_input_mask = use_input_mask
        self.use_labels = use_labels
        self.vocab_size = vocab_size
        self.hidden_size = hidden_size
        self.intermediate_size = intermediate_size
        self.num_attention_heads = num_attention_heads
        self.num_qk_groups = num_qk_groups
        self.chunk_size = chunk_size
        self.sliding_window = sliding_window
        self.rnn_forget_gate_init_length = rnn_forget_gate_init_length
        self.initializer_range = initializer_range
        self.pad_token_id = pad_token_id
        self.bos_token_id = bos_token_id
        self.eos_token_id = eos_token_id

    def get_config(self) -> RatConfig:
        return RatConfig(
            vocab_size=self.vocab_size,
            hidden_size=self.hidden_size,
            intermediate_size=self.intermediate_size,
            num_hidden_layers=self.num_hidden_layers,
            num_attention_heads=self.num_attention_heads,
            num_qk_groups=self.num_qk_groups,
            chunk_size=self.chunk_size,
            layer_types=self.layer_types,
            sliding_window=self.sliding_window if "sliding_attention" in self.layer_types else None,
            rnn_forget_gate_init_length=self.rnn_forget_gate_init_length,
            initializer_range=self.initializer_range,
            pad_token_id=self.pad_token_id,
            bos_token_id=self.bos_token_id,
            eos_token_id=self.eos_token_id,
        )

    def prepare_config_and_inputs(self):
        # Ids from 1 up: never the pad token (0). generate() without a mask derives one from the pad token, and random
        # pad tokens would be padding between real tokens, which RAT refuses to continue where a sliding-window cache
        # keeps it (tests/test_bad_input.py): real prompts do not hold pad tokens among their tokens.
        input_ids = ids_tensor([self.batch_size, self.seq_length], self.vocab_size - 1) + 1
        # Row i: its last i + 1 tokens real, left padding (llama's tester pads on the right: RAT refuses to continue a
        # right-padded prompt, whose next token generate() would read from a padding column).
        input_mask = torch.tril(torch.ones_like(input_ids)).flip(-1) if self.use_input_mask else None
        token_labels = ids_tensor([self.batch_size, self.seq_length], self.vocab_size) if self.use_labels else None
        return self.get_config(), input_ids, input_mask, token_labels

    def prepare_config_and_inputs_for_common(self):
        config, input_ids, input_mask, _ = self.prepare_config_and_inputs()
        return config, {"input_ids": input_ids, "attention_mask": input_mask}

    def create_and_check_model(self, config, input_ids, input_mask, token_labels):
        model = RatModel(config).to(torch_device).eval()
        with torch.no_grad():
            result = model(input_ids, attention_mask=input_mask)
            model(input_ids)
        self.parent.assertEqual(result.last_hidden_state.shape, (self.batch_size, self.seq_length, self.hidden_size))

    def create_and_check_for_causal_lm(self, config, input_ids, input_mask, token_labels):
        model = RatForCausalLM(config).to(torch_device).eval()
        with torch.no_grad():
            result = model(input_ids, attention_mask=input_mask, labels=token_labels)
        self.parent.assertEqual(result.logits.shape, (self.batch_size, self.seq_length, self.vocab_size))
        self.parent.assertTrue(torch.isfinite(result.loss))


class RatCommonTests(ModelTesterMixin, GenerationTesterMixin):
    """The mixins' tests for one layer pattern (`layer_types`, set by each test class below)."""

    layer_types = None
    all_model_classes = (RatModel, RatForCausalLM)

    def setUp(self):
        self.model_tester = RatModelTester(self, layer_types=self.layer_types)
        config = self.model_tester.get_config()
        self.config_tester = ConfigTester(
            self,
            config_class=RatConfig,
            hidden_size=config.hidden_size,
            num_attention_heads=config.num_attention_heads,
            num_hidden_layers=config.num_hidden_layers,
            # config.json stores `layer_types` as `rat_layer_types` (see RatConfig.to_dict), the name ConfigTester then
            # finds in the saved JSON; RatConfig takes both names.
            rat_layer_types=config.layer_types,
            sliding_window=config.sliding_window,
        )
        # The mixins recognise base models and language-model heads (to give them labels, or to expect no loss) by
        # transformers' own tables of model names; RAT registers itself with the Auto classes instead. While a test
        # runs, RAT is in those tables as a model shipped with transformers would be.
        for table, class_name in (
            (modeling_auto.MODEL_MAPPING_NAMES, "RatModel"),
            (modeling_auto.MODEL_FOR_CAUSAL_LM_MAPPING_NAMES, "RatForCausalLM"),
        ):
            patcher = mock.patch.dict(table, {RatConfig.model_type: class_name})
            patcher.start()
            self.addCleanup(patcher.stop)

    def test_config(self):
        self.config_tester.run_common_tests()

    def test_model(self):
        self.model_tester.create_and_check_model(*self.model_tester.prepare_config_and_inputs())

    def test_for_causal_lm(self):
        self.model_tester.create_and_check_for_causal_lm(*self.model_tester.prepare_config_and_inputs())

    # -------------------------------------------------------------------------------- attention weights
    # RAT layers attend to chunk summaries and rnn layers not at all, so RAT models return no attention weights (they
    # refuse `output_attentions=True` with a clear error), in every layer pattern. Tests that only check attention
    # weights are skipped; tests that check attention weights among other outputs run without asking for them.

    @contextmanager
    def _without_attention_weights(self):
        self.has_attentions = False  # the mixins' switch for models without attention weights, for this test only
        try:
            yield
        finally:
            del self.has_attentions

    @unittest.skip(reason="RAT models return no attention weights")
    def test_attention_outputs(self):
        pass

    @unittest.skip(reason="RAT models return no attention weights")
    def test_eager_matches_sdpa_inference_24_fp32_pad_left_output_attentions(self):
        pass

    @unittest.skip(
        reason="RAT layers attend to chunk summaries, each mixing every token of its chunk: an arbitrary 4-D mask cannot "
        "be applied to them. RAT takes 2-D padding masks (and packed position_ids) and refuses 4-D masks with a clear "
        "error (tests/test_modeling.py::test_bad_masks_get_clear_errors)"
    )
    def test_custom_4d_attention_mask(self):
        pass

    def test_model_outputs_equivalence(self):
        with self._without_attention_weights():
            super().test_model_outputs_equivalence()

    def test_retain_grad_hidden_states_attentions(self):
        with self._without_attention_weights():
            super().test_retain_grad_hidden_states_attentions()

    def test_greedy_generate_dict_outputs(self):
        with self._without_attention_weights():
            super().test_greedy_generate_dict_outputs()

    def test_greedy_generate_dict_outputs_use_cache(self):
        with self._without_attention_weights():
            super().test_greedy_generate_dict_outputs_use_cache()

    def test_sample_generate_dict_output(self):
        with self._without_attention_weights():
            super().test_sample_generate_dict_output()

    def test_beam_search_generate_dict_output(self):
        with self._without_attention_weights():
            super().test_beam_search_generate_dict_output()

    def test_beam_search_generate_dict_outputs_use_cache(self):
        with self._without_attention_weights():
            super().test_beam_search_generate_dict_outputs_use_cache()

    def test_beam_sample_generate_dict_output(self):
        with self._without_attention_weights():
            super().test_beam_sample_generate_dict_output()

    def test_assisted_decoding_matches_greedy_search_0_random(self):
        with self._without_attention_weights():
            super().test_assisted_decoding_matches_greedy_search_0_random()

    def test_assisted_decoding_matches_greedy_search_1_same(self):
        with self._without_attention_weights():
            super().test_assisted_decoding_matches_greedy_search_1_same()

    def test_assisted_decoding_sample(self):
        with self._without_attention_weights():
            super().test_assisted_decoding_sample()

    def test_generate_compilation_all_outputs(self):
        with self._without_attention_weights():
            super().test_generate_compilation_all_outputs()

    # --------------------------------------------------------------------- RAT's cache, described to the mixins

    def _check_past_key_values_for_generate(self, batch_size, past_key_values, seq_length, config):
        """
        RAT and rnn layers hold chunk summaries and a running state instead of per-token keys and values (see
        `cache_rat.py`); attention layers of hybrids use transformers' own layers and its shape checks.
        """
        self.assertIsInstance(past_key_values, Cache)
        self.assertEqual(len(past_key_values.layers), config.num_hidden_layers)
        head_dim = config.hidden_size // config.num_attention_heads
        for layer_type, layer in zip(config.layer_types, past_key_values.layers):
            if layer_type == "rat":
                self.assertIsInstance(layer, RatChunkCacheLayer)
                self.assertEqual(layer.running_state.shape, (batch_size, 2, config.hidden_size))
                self.assertEqual(layer.keys.shape[:2], (batch_size, config.num_attention_heads))
                self.assertEqual(layer.keys.shape[3], head_dim)
                self.assertGreaterEqual(layer.keys.shape[2], seq_length // config.chunk_size)
                self.assertEqual(layer.values.shape, layer.keys.shape)
                self.assertEqual(int(layer.get_seq_length()), seq_length)
            elif layer_type == "rnn":
                self.assertIsInstance(layer, RatRecurrentCacheLayer)
                self.assertEqual(layer.running_state.shape, (batch_size, 1, config.hidden_size))
                self.assertEqual(int(layer.get_seq_length()), seq_length)
            else:
                kept = seq_length
                if layer_type == "sliding_attention":  # transformers keeps window - 1 tokens (dynamic), window (static)
                    kept = min(seq_length, config.sliding_window - (0 if layer.is_compileable else 1))
                expected = (batch_size, config.num_attention_heads, kept, head_dim)
                self.assertEqual(layer.keys.shape, expected)
                self.assertEqual(layer.values.shape, expected)

    def _check_caches_are_equal(self, cache1, cache2):
        self.assertEqual(len(cache1.layers), len(cache2.layers))
        for layer1, layer2 in zip(cache1.layers, cache2.layers):
            self.assertEqual(type(layer1), type(layer2))
            if isinstance(layer1, (RatChunkCacheLayer, RatRecurrentCacheLayer)):
                self.assertEqual(int(layer1.get_seq_length()), int(layer2.get_seq_length()))
                torch.testing.assert_close(layer1.num_tokens, layer2.num_tokens)
                torch.testing.assert_close(layer1.running_state, layer2.running_state)
                if isinstance(layer1, RatChunkCacheLayer):
                    chunks = int(layer1.num_tokens.max()) // layer1.chunk_size
                    torch.testing.assert_close(layer1.keys[:, :, :chunks], layer2.keys[:, :, :chunks])
                    torch.testing.assert_close(layer1.values[:, :, :chunks], layer2.values[:, :, :chunks])
            else:
                torch.testing.assert_close(layer1.keys, layer2.keys)
                torch.testing.assert_close(layer1.values, layer2.values)


@require_torch
class RatModelTest(RatCommonTests, unittest.TestCase):
    layer_types = ["rat", "rat"]


@require_torch
class RatRnnModelTest(RatCommonTests, unittest.TestCase):
    layer_types = ["rnn", "rnn"]


@require_torch
class RatSlidingHybridModelTest(RatCommonTests, unittest.TestCase):
    layer_types = ["rat", "sliding_attention"]


@require_torch
class RatFullHybridModelTest(RatCommonTests, unittest.TestCase):
    layer_types = ["rat", "full_attention"]
