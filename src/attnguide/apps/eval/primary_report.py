"""The outputs of ``attnguide eval primary``: ``metrics.json`` (strict JSON: NaN as null) and
``report.md``, which states each primary comparison's interval and verdict, whether the reference is held
out for the model and each extractor, and the exploratory results, labelled so."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

from ..files import write_json_atomic, write_text_atomic

__all__ = ["render_primary_report", "write_primary_outputs"]


def _clean(v: Any) -> Any:
    """``v`` with every non-finite float as None (strict JSON)."""
    if isinstance(v, float):
        return v if math.isfinite(v) else None
    if isinstance(v, dict):
        return {k: _clean(x) for k, x in v.items()}
    if isinstance(v, (list, tuple)):
        return [_clean(x) for x in v]
    return v


def _f(v: Any, digits: int = 4) -> str:
    """``v`` to ``digits`` significant digits ("n/a" where it is not a finite number)."""
    return "n/a" if not isinstance(v, (int, float)) or not math.isfinite(v) else f"{v:.{digits}g}"


def _interval(pair: Any, digits: int = 4) -> str:
    return f"[{_f(pair[0], digits)}, {_f(pair[1], digits)}]" if pair else "n/a"


def _header(r: dict[str, Any]) -> list[str]:
    c, env, t = r["config"], r["environment"], r.get("model_training") or {}
    st = r["statistics"]
    return [
        f"# attnguide eval primary: the pre-registered evaluation ({r['protocol']})",
        "",
        f"Protocol: [`{r['document']}`](../../{r['document']}), committed before these samples were drawn.",
        "",
        f"Command: `{r['command']}`",
        "",
        f"- Device: {env['device']} ({env['device_name']}), {env['threads']} torch thread(s), "
        f"{env['world_size']} process(es); torch {env['torch']}, diffusers {env['diffusers']}.",
        f"- Data set: {c['dataset']}; model `{c['model']}` (digest {c['model_digest']}), trained "
        f"{t.get('steps')} steps (final loss {_f(t.get('final_loss'), 4)}).",
        f"- Samples per arm: {c['num_samples']} ({c['sampler']} at {c['steps']} steps; sample i from seed "
        f"{c['seed']} + i, conditional arms label i mod 10: every two arms are paired).",
        f"- Features: {r['extractor']['name']} ({r['extractor']['description']}).",
        f"- Statistics: {st['bootstrap']} bootstrap resamples of the samples AND the reference (sFID: the "
        f"first {st['sfid_bootstrap']}); {st['correction']}; {st['seed_blocks']} seed blocks of "
        f"{st['block_sizes']} (descriptive).",
        *_reference_lines(r.get("reference") or {}),
        "",
    ]


def _reference_lines(ref: dict[str, Any]) -> list[str]:
    lines = [
        f"- Reference: {ref.get('count')} images, the {ref.get('part')} part of {ref.get('split')} "
        f"({ref.get('source')}), per class {ref.get('per_class')}."
    ]
    model = ref.get("held_out_for_model") or {}
    lines.append(
        f"- Held out for the model: **{'yes' if model.get('held_out') else 'no'}** ({model.get('why')})."
    )
    for identity, status in (ref.get("held_out_for_extractors") or {}).items():
        held = "yes" if status.get("held_out") else "no"
        lines.append(f"- Held out for extractor `{identity}`: **{held}** ({status.get('why')}).")
    return lines


def _primary_lines(r: dict[str, Any]) -> list[str]:
    lines = [
        "## Primary comparisons (FID, lower is better)",
        "",
        "| # | arm | against | delta FID | corrected interval | verdict | blocks, same sign | question |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for p in r["primary"]:
        fid = p["fid"]
        against = p["b"][0] if len(p["b"]) == 1 else f"best of {', '.join(p['b'])}"
        blocks = f"{fid['blocks_same_sign']}/{len(fid['blocks'])}"
        lines.append(
            f"| {p['id']} | {p['a']} | {against} | {_f(fid['delta'])} | {_interval(fid['ci_corrected'])} | "
            f"**{fid['verdict']}** | {blocks} | {p['question']} |"
        )
    return [*lines, ""]


def _arm_lines(r: dict[str, Any]) -> list[str]:
    lines = [
        "## Every arm (exploratory: full-sample metrics)",
        "",
        "| arm | key | FID | sFID | IS | precision | recall | class accuracy | mask fraction | s / sample |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for label, a in r["arms"].items():
        m = a["metrics"]
        lines.append(
            f"| {label} | `{a['arm']}` | {_f(m['fid'])} | {_f(m['sfid'])} | {_f(m['is'])} | "
            f"{_f(m['precision'])} | {_f(m['recall'])} | {_f(m['accuracy'])} | {_f(a['mask_fraction'])} | "
            f"{_f(a['seconds_per_sample'], 4)} |"
        )
    return [*lines, ""]


def _exploratory_lines(r: dict[str, Any]) -> list[str]:
    lines = [
        "## The primary pairs on the other metrics (exploratory: uncorrected 95 % percentile intervals)",
        "",
        "| # | sFID | IS | precision | recall |",
        "|---|---|---|---|---|",
    ]
    for p in r["primary"]:
        cells = [
            f"{_f(p['exploratory'][m]['delta'])} {_interval(p['exploratory'][m]['ci95'])}"
            for m in ("sfid", "is", "precision", "recall")
        ]
        lines.append(f"| {p['id']} | " + " | ".join(cells) + " |")
    return [*lines, ""]


def _check_lines(r: dict[str, Any]) -> list[str]:
    lines = ["## Checks (exploratory)", ""]
    d = r.get("ddim_check") or {}
    for name, v in d.items():
        if isinstance(v, dict) and "sag_effect" in v:
            fids = ", ".join(f"{k} {_f(x)}" for k, x in v["fid"].items())
            effect = _f(v["sag_effect"])
            lines.append(f"- Sampler check, first {d['samples']} seeds, {name}: {fids}; SAG effect {effect}.")
    g = r.get("agreement")
    if g:
        same = sum(v["same_sign"] for v in g["primary"].values())
        lines.append(
            f"- Second extractor `{g['second_extractor']}`: Kendall tau of the arms' FIDs "
            f"{_f(g['kendall_tau_fid'])}; {same}/{len(g['primary'])} primary deltas of the same sign."
        )
    return [*lines, ""]


def render_primary_report(r: dict[str, Any]) -> str:
    """``report.md`` of a results record."""
    lines = [*_header(r), *_primary_lines(r), *_exploratory_lines(r), *_arm_lines(r), *_check_lines(r)]
    return "\n".join(lines).rstrip() + "\n"


def write_primary_outputs(results: dict[str, Any], out: Path) -> None:
    """Write ``metrics.json`` and ``report.md`` into ``out``."""
    clean = _clean(results)
    write_json_atomic(out / "metrics.json", clean)
    write_text_atomic(out / "report.md", render_primary_report(clean))
    json.dumps(clean, allow_nan=False)  # strict JSON, checked
