"""
Length sweeps, shared by the mixer and model benchmarks: every (length, mode, name) at a constant number of tokens
per batch; per mode, the baseline's time and peak memory over each candidate's at every length and the break-even
length; one markdown table per mode; time and memory plotted against the length.
"""

import math

from .common import (
    byte_unit,
    case_cell,
    find_case,
    format_bytes,
    format_length,
    format_ratio,
    format_seconds,
    length_axis,
    markdown_table,
    pyplot,
    ratio,
)


def sweep_plan(settings, field: str, names) -> list[dict]:
    """Every (length, mode, name) of a sweep at `settings.tokens_per_batch` tokens per batch (batch 1 beyond it)."""
    return [{field: name, "mode": mode, "seq_len": seq_len, "batch": max(1, settings.tokens_per_batch // seq_len)}
            for seq_len in settings.lengths for mode in settings.modes for name in names]


def sweep_summary(cases: list[dict], settings, field: str, baseline: str, candidates) -> dict:
    """Per mode and candidate: baseline / candidate time and memory per length, and the break-even length."""
    summary = {}
    for mode in settings.modes:
        summary[mode] = {}
        for name in candidates:
            rows = []
            for seq_len in settings.lengths:
                base = find_case(cases, **{field: baseline}, mode=mode, seq_len=seq_len)
                candidate = find_case(cases, **{field: name}, mode=mode, seq_len=seq_len)
                rows.append({"seq_len": seq_len, "time_ratio": ratio(base, candidate, "median_s"),
                             "memory_ratio": ratio(base, candidate, "peak_memory_bytes")})
            lengths, ratios = [row["seq_len"] for row in rows], [row["time_ratio"] for row in rows]
            summary[mode][name] = {"ratios": rows, "break_even": break_even(lengths, ratios)}
    return summary


def sweep_tables(result: dict, field: str, names, baseline: str, mode_labels: dict) -> list[str]:
    """One markdown table per mode: time and peak memory of every name per length, and the ratios to the baseline."""
    parts = []
    candidates = [name for name in names if name != baseline]
    for mode in result["settings"]["modes"]:
        summary = result["summary"][mode]
        headers = ["T", "batch", *(f"{name} time" for name in names), *(f"speed-up {name}" for name in candidates),
                   *(f"{name} memory" for name in names), *(f"memory ratio {name}" for name in candidates)]
        rows = []
        for index, seq_len in enumerate(result["settings"]["lengths"]):
            found = [find_case(result["cases"], **{field: name}, mode=mode, seq_len=seq_len) for name in names]
            ratios = [summary[name]["ratios"][index] for name in candidates]
            rows.append([format_length(seq_len), next((case["batch"] for case in found if case), "–"),
                         *(case_cell(case, "median_s", format_seconds) for case in found),
                         *(format_ratio(row["time_ratio"]) for row in ratios),
                         *(case_cell(case, "peak_memory_bytes", format_bytes) for case in found),
                         *(format_ratio(row["memory_ratio"]) for row in ratios)])
        even = "; ".join(f"{name}: {summary[name]['break_even']['text']}" for name in candidates)
        parts += ["", f"**{mode_labels[mode]}** (break-even: {even})", "", markdown_table(headers, rows)]
    return parts


def break_even(lengths: list[int], ratios: list[float | None]) -> dict:
    """
    The length from which RAT is faster (baseline time / RAT time >= 1) at every longer measured length,
    interpolated linearly in log(length)-log(ratio) between the two measured lengths around the crossing.
    """
    points = [(length, value) for length, value in zip(lengths, ratios) if value is not None and value > 0]
    if not points:
        return {"status": "unknown", "length": None, "text": "no successful pair of measurements"}
    first_faster = len(points)
    while first_faster > 0 and points[first_faster - 1][1] >= 1:
        first_faster -= 1
    if first_faster == len(points):
        if any(value >= 1 for _, value in points):
            return {"status": "not_sustained", "length": None,
                    "text": f"RAT is faster at some lengths but not at the longest ({format_length(points[-1][0])})"}
        return {"status": "not_reached", "length": None,
                "text": f"RAT is slower at every measured length (up to {format_length(points[-1][0])})"}
    if first_faster == 0:
        return {"status": "below_range", "length": None,
                "text": f"RAT is faster at every measured length (from {format_length(points[0][0])})"}
    (short, short_ratio), (long, long_ratio) = points[first_faster - 1], points[first_faster]
    fraction = -math.log(short_ratio) / (math.log(long_ratio) - math.log(short_ratio))
    length = round(math.exp(math.log(short) + fraction * (math.log(long) - math.log(short))))
    return {"status": "crossed", "length": length, "between": [short, long],
            "text": f"about {length:,} tokens (between {format_length(short)} and {format_length(long)})"}


def plot_length_sweep(result: dict, path, field: str, names, mode_labels: dict, title: str) -> None:
    """Time (top row) and peak memory (bottom row) against the length, log-log; a column per mode, a line per name."""
    plt = pyplot()
    settings, cases = result["settings"], [case for case in result["cases"] if case["status"] == "ok"]
    unit, unit_size = byte_unit(max((case["peak_memory_bytes"] for case in cases), default=1))
    modes = settings["modes"]
    figure, axes = plt.subplots(2, len(modes), figsize=(6 * len(modes), 8), squeeze=False, layout="constrained")
    rows = [("median_s", "time per batch (s)", 1), ("peak_memory_bytes", f"peak memory ({unit})", unit_size)]
    for column, mode in enumerate(modes):
        for row, (key, label, scale) in enumerate(rows):
            axis = axes[row][column]
            for name in names:
                points = [(case["seq_len"], case[key] / scale) for case in cases
                          if case[field] == name and case["mode"] == mode and case[key]]
                if points:
                    axis.plot(*zip(*points), marker="o", label=name)
            length_axis(axis, "sequence length T")
            axis.set(yscale="log", ylabel=label,
                     title=f"{mode_labels[mode]}, {settings['tokens_per_batch']:,} tokens per batch")
            axis.grid(True, which="both", alpha=0.3)
            if axis.lines:
                axis.legend()
    figure.suptitle(f"{title}, {result['options']['dtype']} on {result['options']['device']}")
    figure.savefig(path, dpi=120)
    plt.close(figure)
