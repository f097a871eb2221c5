"""
The benchmark suite (`benchmarks/`): every benchmark runs at toy sizes and writes well-formed JSON and PNG files;
the correctness checks refuse wrong implementations; the measuring machinery (isolated runs, timing, peak memory)
does what it says. No figure is asserted to be fast or slow: timings are not tests.
"""

import dataclasses
import json
import math
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from benchmarks import cache, common, decode, mixer, model, sweep
from benchmarks import run as suite
from modeling_rat import RatConfig, RatForCausalLM


ROOT = Path(__file__).resolve().parents[1]
IN_PROCESS = common.RunOptions(device="cpu", dtype="float32", threads=1, isolate=False, max_run_time=0.05)
ISOLATED = dataclasses.replace(IN_PROCESS, isolate=True, case_timeout_s=300)
SMOKE = suite.settings_for("smoke", "cpu")


def load_json(path):
    """Strict JSON: NaN or Infinity would raise."""
    def refuse(constant):
        raise ValueError(f"non-standard JSON constant {constant}")

    return json.loads(path.read_text(), parse_constant=refuse)


def assert_png(path):
    data = path.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n", f"{path} is not a PNG file"
    import matplotlib.image

    image = matplotlib.image.imread(path)
    assert image.shape[0] > 200 and image.shape[1] > 200
    assert image.std() > 0, f"{path} is blank"


def assert_common_fields(data, name):
    assert data["benchmark"] == name
    for key in ("cpu", "logical_cores", "torch", "transformers", "torch_threads", "device", "dtype"):
        assert data["machine"][key] is not None, key
    assert data["options"]["threads"] == 1
    assert data["checks"] and all(check["passed"] for check in data["checks"])


def assert_timed(case, time_key="median_s", times_key="times_s"):
    assert case["status"] == "ok", case
    assert case[time_key] > 0 and math.isfinite(case[time_key])
    assert len(case[times_key]) >= 1 and min(case[times_key]) <= case[time_key] <= max(case[times_key])
    assert isinstance(case["peak_memory_bytes"], int) and case["peak_memory_bytes"] >= 0
    assert case["memory_method"]


def perturbed(function, factor=1.01):
    def wrong(*args, **kwargs):
        return function(*args, **kwargs) * factor
    return wrong


def refuse_to_time(monkeypatch, *modules):
    """Make the benchmarks' `run_cases` fail the test: nothing may be timed after a failed correctness check."""
    def run_cases(*args, **kwargs):
        raise AssertionError("a benchmark timed something after a failed correctness check")

    for module in modules:
        monkeypatch.setattr(module, "run_cases", run_cases)


def rat_mixer_class():
    return type(mixer.build_mixer(SMOKE["mixer"], "rat", IN_PROCESS).layers[0].mixer)


# ================================================================================================ each benchmark


def test_mixer_benchmark_writes_json_png_and_markdown(tmp_path):
    settings = SMOKE["mixer"]
    result = mixer.run(settings, IN_PROCESS, output_dir=tmp_path)
    data = load_json(tmp_path / "mixer.json")
    assert data == common.json_ready(result)
    assert_common_fields(data, "mixer")
    names = [check["name"] for check in data["checks"]]
    assert any("RAT mixer" in name and "gradient" in name for name in names)
    assert any("SDPA attention" in name and "gradient" in name for name in names)
    assert len(data["cases"]) == len(settings.lengths) * len(settings.modes) * len(mixer.MIXERS)
    for case in data["cases"]:
        assert_timed(case)
        assert case["batch"] * case["seq_len"] == settings.tokens_per_batch
    for mode in settings.modes:
        rows = data["summary"][mode]["rat"]["ratios"]
        assert [row["seq_len"] for row in rows] == list(settings.lengths)
        for row in rows:
            attention = common.find_case(data["cases"], mixer="attention", mode=mode, seq_len=row["seq_len"])
            rat = common.find_case(data["cases"], mixer="rat", mode=mode, seq_len=row["seq_len"])
            assert row["time_ratio"] == pytest.approx(attention["median_s"] / rat["median_s"])
            assert row["memory_ratio"] == common.ratio(attention, rat, "peak_memory_bytes")
        assert data["summary"][mode]["rat"]["break_even"]["status"] in (
            "crossed", "below_range", "not_reached", "not_sustained")
    assert_png(tmp_path / "mixer.png")
    text = mixer.markdown(result)
    assert "forward + backward" in text and text.count("\n| 16 |") == len(settings.modes)
    assert "| rat memory | attention memory | memory ratio rat |" in text


def test_mixer_call_runs_the_mixer_as_the_model_does():
    """The mixer alone, on the arguments taken from the model, computes what it computes inside the model."""
    built = mixer.build_mixer(SMOKE["mixer"], "rat", IN_PROCESS)
    seen = {}
    handle = built.layers[0].mixer.register_forward_hook(
        lambda module, args, output: seen.update(hidden_states=args[0], output=output))
    with torch.no_grad():
        built(inputs_embeds=torch.randn(2, 11, SMOKE["mixer"].hidden_size), use_cache=False)
        handle.remove()
        alone = mixer.mixer_call(built, 2, 11)(seen["hidden_states"])
    torch.testing.assert_close(alone, seen["output"], rtol=0, atol=0)


def test_model_benchmark_writes_json_png_and_markdown(tmp_path):
    settings = SMOKE["model"]
    result = model.run(settings, IN_PROCESS, output_dir=tmp_path)
    data = load_json(tmp_path / "model.json")
    assert_common_fields(data, "model")
    assert {check["name"].split(" ")[0] for check in data["checks"]} == set(settings.models)
    assert len(data["cases"]) == len(settings.lengths) * len(settings.modes) * len(settings.models)
    for case in data["cases"]:
        assert_timed(case)
        assert case["tokens_per_s"] == pytest.approx(case["batch"] * case["seq_len"] / case["median_s"])
    # equal width, depth and MLP width: Llama's SwiGLU MLP has one matrix more per layer (D x 4D)
    architecture = settings.architecture
    hidden, layers = architecture.hidden_size, architecture.num_layers
    built = {name: settings.build(name, IN_PROCESS) for name in settings.models}
    for name in settings.models:
        assert data["parameters"][name]["parameters"] == built[name].num_parameters()
    group_width = hidden // architecture.num_heads * architecture.num_qk_groups
    rat_mixer_params = 4 * hidden * hidden + 2 * hidden * group_width + hidden
    llama_layer = 4 * hidden * hidden + 3 * 4 * hidden * hidden
    rat_layer = rat_mixer_params + 2 * 4 * hidden * hidden
    non_embedding = {name: data["parameters"][name]["non_embedding_parameters"] for name in settings.models}
    assert non_embedding["llama"] - non_embedding["rat"] == layers * (llama_layer - rat_layer)
    for mode in settings.modes:
        assert set(data["summary"][mode]) == {"rat", "rat-swa"}
    assert_png(tmp_path / "model.png")
    assert "training step" in model.markdown(result)


def test_decode_benchmark_writes_json_png_and_markdown(tmp_path):
    settings = SMOKE["decode"]
    result = decode.run(settings, IN_PROCESS, output_dir=tmp_path)
    data = load_json(tmp_path / "decode.json")
    assert_common_fields(data, "decode")
    assert {(check["model"], check["cache"]) for check in data["checks"]} == {
        (name, cache_kind) for name in settings.models for cache_kind in settings.caches
    }
    grid = (settings.contexts, settings.batches, settings.caches, settings.models)
    assert len(data["cases"]) == math.prod(len(values) for values in grid)
    for case in data["cases"]:
        assert_timed(case, "generate_median_s", "generate_times_s")
        assert_timed(case, "prefill_median_s", "prefill_times_s")
        assert case["decode_s"] == pytest.approx(case["generate_median_s"] - case["prefill_median_s"])
        decoded = case["batch"] * (settings.new_tokens - 1)
        assert case["decode_tokens_per_s"] == pytest.approx(decoded / case["decode_s"])
        if case["model"] == "llama" and case["cache"] == "dynamic":
            # keys and values of every token fed to the model (the last generated token is never fed)
            tokens = case["context"] + settings.new_tokens - 1
            width, layers = settings.architecture.hidden_size, settings.architecture.num_layers
            assert case["cache_bytes"] == 2 * layers * case["batch"] * tokens * width * 4
    for row in data["summary"]["ratios"]:
        assert row["speed_up"] is not None and row["cache_ratio"] > 1  # a RAT cache is smaller than Llama's
    assert_png(tmp_path / "decode.png")
    text = decode.markdown(result)
    assert "**dynamic cache**" in text and "**static cache**" in text


def test_decode_rate_is_refused_when_decoding_takes_no_measurable_time(monkeypatch):
    """generate() of many tokens timed no slower than of one: no rate is made up, the case says why."""
    monkeypatch.setattr(decode, "time_call", lambda function, options: {"median_s": 0.5, "times_s": [0.5]})
    settings = dataclasses.replace(SMOKE["decode"], contexts=(8,), batches=(1,), models=("rat",), caches=("dynamic",))
    (case,) = decode.run(settings, IN_PROCESS)["cases"]
    assert case["status"] == "failed" and "decode more tokens" in case["error"]


def test_cache_benchmark_matches_the_formula(tmp_path):
    settings = SMOKE["cache"]
    result = cache.run(settings, IN_PROCESS, output_dir=tmp_path)
    data = load_json(tmp_path / "cache.json")
    assert_common_fields(data, "cache")
    assert data["all_match_formula"] is True
    assert [entry["model"] for entry in data["models"]] == list(cache.PAPER_MODELS)
    hidden = data["measured_size"]["hidden_size"]
    layers = data["measured_size"]["num_hidden_layers"]
    by_model = {entry["model"]: {point["context"]: point["bytes"] for point in entry["points"]}
                for entry in data["models"]}
    for context in settings.contexts:
        assert by_model["attention"][context] == layers * 2 * context * hidden * 4
        assert by_model["rnn"][context] == layers * hidden * 4
    assert_png(tmp_path / "cache.png")
    assert "every measurement equals the formula" in cache.markdown(result)


def test_cache_formula_by_hand():
    config = RatConfig(hidden_size=64, num_hidden_layers=4, num_attention_heads=4, chunk_size=16, sliding_window=33,
                       layer_types=["rat", "full_attention", "sliding_attention", "rnn"])
    # rat: 2 * floor(100/16) * 64 * 2 bytes + 2 * 64 * 4; full: 2 * 100 * 64 * 2; sliding: 2 * 32 * 64 * 2; rnn: 64 * 4
    expected = (2 * 6 * 64 * 2 + 2 * 64 * 4) + 2 * 100 * 64 * 2 + 2 * 32 * 64 * 2 + 64 * 4
    assert cache.formula_bytes(config, 100, element_size=2) == expected
    expected = (0 + 2 * 64 * 4) + 2 * 10 * 64 * 4 + 2 * 10 * 64 * 4 + 64 * 4
    assert cache.formula_bytes(config, 10, element_size=4) == expected


# ============================================================================================= refusing to time


def test_mixer_benchmark_refuses_a_wrong_rat_mixer(monkeypatch):
    mixer_class = rat_mixer_class()
    original = mixer_class.forward

    def wrong_fast_path(self, *args, **kwargs):
        out = original(self, *args, **kwargs)
        return out if self.config.rat_implementation == "reference" else out * 1.01

    monkeypatch.setattr(mixer_class, "forward", wrong_fast_path)
    refuse_to_time(monkeypatch, mixer)
    with pytest.raises(common.CorrectnessError, match="refusing to time it") as error:
        mixer.run(SMOKE["mixer"], IN_PROCESS)
    assert "RAT mixer" in str(error.value) and "SDPA attention" not in str(error.value)


def test_mixer_benchmark_refuses_a_wrong_attention(monkeypatch):
    monkeypatch.setattr(F, "scaled_dot_product_attention", perturbed(F.scaled_dot_product_attention))
    refuse_to_time(monkeypatch, mixer)
    with pytest.raises(common.CorrectnessError) as error:
        mixer.run(SMOKE["mixer"], IN_PROCESS)
    assert "SDPA attention mixer" in str(error.value)


def test_model_benchmark_refuses_wrong_models(monkeypatch):
    mixer_class = rat_mixer_class()
    original = mixer_class.forward

    def wrong_fast_path(self, *args, **kwargs):
        out = original(self, *args, **kwargs)
        return out if self.config.rat_implementation == "reference" else out + 0.01

    monkeypatch.setattr(mixer_class, "forward", wrong_fast_path)
    refuse_to_time(monkeypatch, model)
    with pytest.raises(common.CorrectnessError) as error:
        model.run(SMOKE["model"], IN_PROCESS)
    message = str(error.value)
    assert "rat auto" in message and "rat-swa auto" in message and "llama" not in message

    monkeypatch.setattr(mixer_class, "forward", original)
    monkeypatch.setattr(F, "scaled_dot_product_attention", perturbed(F.scaled_dot_product_attention))
    with pytest.raises(common.CorrectnessError, match="llama sdpa"):
        model.run(dataclasses.replace(SMOKE["model"], models=("llama",)), IN_PROCESS)


def _perturb_decoding(monkeypatch, only_static: bool):
    """RatForCausalLM.forward returns wrong logits for single-token (decoding) steps."""
    original = RatForCausalLM.forward

    def forward(self, input_ids=None, *args, **kwargs):
        output = original(self, input_ids, *args, **kwargs)
        cache_object = kwargs.get("cache") if kwargs.get("cache") is not None else kwargs.get("past_key_values")
        is_static = type(cache_object).__name__ == "StaticCache"
        if input_ids is not None and input_ids.shape[1] == 1 and (is_static or not only_static):
            output.logits = output.logits + 0.5
        return output

    monkeypatch.setattr(RatForCausalLM, "forward", forward)


def test_decode_benchmark_refuses_wrong_decoding(monkeypatch):
    _perturb_decoding(monkeypatch, only_static=False)
    refuse_to_time(monkeypatch, decode)
    with pytest.raises(common.CorrectnessError, match="rat generate\\(\\) with the dynamic cache"):
        decode.run(SMOKE["decode"], IN_PROCESS)


def test_decode_benchmark_reports_a_wrong_static_cache_and_goes_on(monkeypatch, tmp_path):
    _perturb_decoding(monkeypatch, only_static=True)
    settings = dataclasses.replace(SMOKE["decode"], contexts=(8,), batches=(1,))
    result = decode.run(settings, IN_PROCESS, output_dir=tmp_path)
    statuses = {(case["model"], case["cache"]): case["status"] for case in result["cases"]}
    assert statuses == {("rat", "dynamic"): "ok", ("llama", "dynamic"): "ok",
                        ("rat", "static"): "refused", ("llama", "static"): "ok"}
    refused = next(case for case in result["cases"] if case["status"] == "refused")
    assert "correctness check failed" in refused["error"]
    text = decode.markdown(result)
    assert "Not timed (correctness check failed)" in text and "| refused |" in text
    saved = load_json(tmp_path / "decode.json")["cases"]
    assert common.find_case(saved, model="rat", cache="static")["status"] == "refused"


def test_decode_benchmark_reports_a_static_cache_that_raises(monkeypatch):
    original = RatForCausalLM.forward

    def forward(self, *args, **kwargs):
        if type(kwargs.get("cache")).__name__ == "StaticCache":
            raise KeyError("rat")
        return original(self, *args, **kwargs)

    monkeypatch.setattr(RatForCausalLM, "forward", forward)
    settings = dataclasses.replace(SMOKE["decode"], contexts=(8,), batches=(1,), models=("rat",))
    result = decode.run(settings, IN_PROCESS)
    static = next(case for case in result["cases"] if case["cache"] == "static")
    assert static["status"] == "refused" and "KeyError" in static["error"]


def test_cache_benchmark_refuses_wrong_decoding_and_reports_formula_mismatches(monkeypatch):
    settings = dataclasses.replace(SMOKE["cache"], models=("rat", "attention"))
    monkeypatch.setattr(cache, "cache_nbytes", lambda cache_object: 123)
    result = cache.run(settings, IN_PROCESS)
    assert result["all_match_formula"] is False
    assert all(not point["matches_formula"] for entry in result["models"] for point in entry["points"])
    assert "some measurements differ from the formula" in cache.markdown(result)

    _perturb_decoding(monkeypatch, only_static=False)
    with pytest.raises(common.CorrectnessError, match="rat \\(tiny\\) generate"):
        cache.run(settings, IN_PROCESS)


# ============================================================================================== the machinery


def test_break_even():
    crossed = sweep.break_even([1024, 2048, 4096], [0.5, 0.8, 2.0])
    assert crossed["status"] == "crossed" and crossed["between"] == [2048, 4096]
    # log-log interpolation: ratio 0.8 -> 2.0 over one doubling crosses 1 at 2048 * 2 ** (log(1.25) / log(2.5))
    assert crossed["length"] == round(2048 * 2 ** (math.log(1.25) / math.log(2.5)))
    assert sweep.break_even([1, 2], [1.5, 3.0])["status"] == "below_range"
    assert sweep.break_even([1, 2], [0.5, 0.9])["status"] == "not_reached"
    assert sweep.break_even([1, 2, 4], [1.1, 1.5, 0.7])["status"] == "not_sustained"
    assert sweep.break_even([1, 2], [None, None])["status"] == "unknown"
    # a crossing followed by a dip below 1 again: the break-even is where RAT stays faster
    assert sweep.break_even([1, 2, 4, 8], [0.5, 1.2, 0.9, 1.5])["between"] == [4, 8]


def test_time_call_uses_the_runs_thread_count_and_reports_every_block():
    threads_seen = []

    def function():
        threads_seen.append(torch.get_num_threads())
        time.sleep(0.002)

    threads = torch.get_num_threads()
    timing = common.time_call(function, dataclasses.replace(IN_PROCESS, threads=2, max_run_time=0.05))
    assert torch.get_num_threads() == threads  # restored afterwards
    assert set(threads_seen) == {2}
    assert timing["median_s"] >= 0.002 and min(timing["times_s"]) <= timing["median_s"] <= max(timing["times_s"])
    # warm-up calls come on top of the timed blocks
    assert len(threads_seen) > timing["calls_per_block"] * len(timing["times_s"])


def failing_case(case, settings, options):
    raise ValueError("bad case")


def killed_case(case, settings, options):
    signal.raise_signal(signal.SIGKILL)


def sleeping_case(case, settings, options):
    time.sleep(60)


@pytest.mark.slow  # starts the process server (imports torch and transformers once)
def test_isolated_runs_report_failures_crashes_and_timeouts():
    failed = common.run_case(failing_case, {}, None, ISOLATED)
    assert failed["status"] == "failed" and "ValueError: bad case" in failed["error"] and failed["isolated"]
    crashed = common.run_case(killed_case, {}, None, ISOLATED)
    assert crashed["status"] == "crashed" and "signal 9" in crashed["error"]
    timed_out = common.run_case(sleeping_case, {}, None, dataclasses.replace(ISOLATED, case_timeout_s=1))
    assert timed_out["status"] == "timeout"
    out_of_memory = common.failure_record(torch.OutOfMemoryError("CUDA out of memory"))
    assert out_of_memory["status"] == "out_of_memory"


@pytest.mark.slow  # starts the process server (imports torch and transformers once)
def test_peak_memory_reads_a_known_allocation_in_a_fresh_process():
    size = 64 * 2**20
    probe = common.run_case(common.memory_probe, {"bytes": size}, None, ISOLATED)
    assert probe["status"] == "ok" and probe["isolated"]
    # the tensor's pages plus at most a few MiB of allocator bookkeeping
    assert size <= probe["peak_memory_bytes"] <= size + 8 * 2**20, probe


@pytest.mark.slow  # starts the process server (imports torch and transformers once)
def test_cli_smoke_run_in_fresh_processes(tmp_path):
    code = suite.main(["--smoke", "--only", "cache,mixer", "--threads", "1", "--output", str(tmp_path)])
    assert code == 0
    report = (tmp_path / "results.md").read_text()
    assert "CPU:" in report and "torch threads 1" in report and "Token mixer" in report and "Decoding cache" in report
    assert "allocation reads as" in report
    for name in ("mixer", "cache"):
        data = load_json(tmp_path / f"{name}.json")
        assert data["machine"]["memory_probe"]["status"] == "ok"
        assert_png(tmp_path / f"{name}.png")
    mixer_cases = load_json(tmp_path / "mixer.json")["cases"]
    assert all(case["status"] == "ok" and case["isolated"] for case in mixer_cases)
    assert not (tmp_path / "model.json").exists()


@pytest.mark.parametrize("arguments", [["--only", "mixer,speed"], ["--max-run-time", "0"], ["--lengths", "1024,x"],
                                       ["--lengths", "0"], ["--dtype", "float64"]])
def test_cli_rejects_bad_arguments(arguments, capsys):
    with pytest.raises(SystemExit) as exit_code:
        suite.parse_args(arguments)
    assert exit_code.value.code == 2 and "error:" in capsys.readouterr().err


@pytest.mark.slow  # a fresh interpreter imports torch
def test_running_a_script_as_a_file_says_how_to_run_it():
    done = subprocess.run([sys.executable, "benchmarks/run.py", "--smoke"], cwd=ROOT, capture_output=True, text=True)
    assert done.returncode == 1 and "error: run the suite as a module" in done.stderr
    assert "python -m benchmarks.run" in done.stderr


def test_published_results_named_in_the_docs_exist():
    """README's Performance section and docs/benchmarks.md point at result files that are in the repository."""
    for document in ("README.md", "docs/benchmarks.md"):
        text = (ROOT / document).read_text()
        assert "benchmarks/results" not in text, f"{document} names a result folder that no longer exists"
        paths = set(re.findall(r"results/benchmarks/[\w./*-]*[\w*]", text))
        assert paths, f"{document} names no published result"
        for path in paths:
            assert list(ROOT.glob(path)), f"{document} names {path}, which does not exist"


@pytest.mark.parametrize("make, message", [
    (lambda: mixer.MixerSettings(modes=("fwd",)), "`modes`"),
    (lambda: mixer.MixerSettings(lengths=(0, 1024)), "`lengths`"),
    (lambda: model.ModelSettings(models=("rat", "gpt2")), "`models`"),
    (lambda: decode.DecodeSettings(caches=("paged",)), "`caches`"),
    (lambda: decode.DecodeSettings(new_tokens=1), "`new_tokens`"),
    (lambda: cache.CacheSettings(size="huge"), "size"),
])
def test_settings_refuse_bad_values(make, message):
    with pytest.raises(ValueError, match=message):
        make()


def test_targets_report_is_rebuilt_from_saved_results(tmp_path):
    """`targets.py --only none` measures nothing and rebuilds the report from the JSON files of earlier runs,
    with the figures behind each ratio and whether the target is met."""
    from benchmarks import targets

    def case(value_key, value, **labels):
        return {"status": "ok", value_key: value, **labels}

    machine = {"date_utc": "2026-01-01 00:00 UTC"}
    mixer_cases = []
    for length, rat_s, attention_s in ((16384, 2.0, 12.0), (32768, 4.0, 20.0)):
        for kind, seconds, memory in (("rat", rat_s, 100 * 2**20), ("attention", attention_s, 200 * 2**20)):
            mixer_cases.append({"status": "ok", "mixer": kind, "mode": "forward_backward", "seq_len": length,
                                "median_s": seconds, "peak_memory_bytes": memory})
    (tmp_path / "mixer.json").write_text(json.dumps({"machine": machine, "cases": mixer_cases}))
    threads = torch.get_num_threads()
    try:
        targets.main(["--only", "none", "--threads", "1", "--output", str(tmp_path)])
    finally:
        torch.set_num_threads(threads)
    report = (tmp_path / "targets.md").read_text()
    assert ("| mixer fwd+bwd, T=16K: attention time / RAT time | 6.00x | >= 5x | yes | attention 12.00 s, RAT 2.00 s |"
            in report)
    assert "| mixer fwd+bwd, T=32K: attention time / RAT time | 5.00x | >= 8x | no |" in report
    assert ("| mixer fwd+bwd, T=16K: attention memory / RAT memory | 2.00x | >= 1x | yes | "
            "attention 200.0 MiB, RAT 100.0 MiB |") in report
    assert "one-layer model" not in report  # no saved model.json: that section is absent, not invented
    with pytest.raises(SystemExit):
        targets.main(["--only", "mixer,bogus", "--output", str(tmp_path)])


def test_mixer_profile_splits_the_time_into_categories(tmp_path):
    from benchmarks import profile_mixer

    assert profile_mixer.category("aten::mm") == "matmul"
    assert profile_mixer.category("aten::_scaled_dot_product_flash_attention_for_cpu_backward") == "attention kernel"
    assert profile_mixer.category("aten::addcmul") == "everything else"
    threads = torch.get_num_threads()
    try:
        profile_mixer.main(["--length", "48", "--threads", "1", "--output", str(tmp_path)])
    finally:
        torch.set_num_threads(threads)
    result = load_json(tmp_path / "profile_mixer_T48.json")
    for kind in ("rat", "attention"):
        seconds = result["mixers"][kind]["seconds"]
        assert seconds["matmul"] > 0 and seconds["attention kernel"] > 0
        assert math.isclose(sum(seconds.values()), result["mixers"][kind]["total_s"])
    assert result["ratio_ceiling_without_elementwise"] > result["measured_ratio"]
