"""The configuration of an ``attnguide eval`` run, recorded in ``config.json``: a folder written for
another configuration is refused, so resumed shards always belong to the run that resumes them."""

from __future__ import annotations

import argparse
import hashlib
import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from .experiments import ROW_TERMS

__all__ = ["SAMPLE_KEYS", "SCHEMA", "check_config", "config_digest", "eval_config", "model_digest"]

SCHEMA = 1
#: The config keys of the ROW_TERMS: each one's scale and its other flagged settings ("seg_sigma").
TERM_ROW_KEYS = tuple(
    key
    for cls in ROW_TERMS
    for key in (
        f"{cls.name}_scale",
        *(f"{cls.name}_{p.name}" for p in cls.app.params[1:] if p.flag and p.inf_allowed),
    )
)
#: The config keys that decide the samples; a mismatch in an existing folder is refused.
SAMPLE_KEYS = (
    "schema",
    "experiments",
    "num_samples",
    "steps",
    "scheduler",
    "seed",
    "batch_size",
    "model",
    "model_digest",
    "sag_scale",
    "cfg_scale",
    "pag_scale",
    *TERM_ROW_KEYS,
    "scales",
    "sigmas",
    "calibration_samples",
    "cost_batch",
    "sag_sigmas",
    "classifier_scale",
    "noisy_classifier",
)


def noisy_classifier_digest(args: argparse.Namespace) -> str:
    """The digest of the noise-aware classifier of table3's classifier guidance (``--noisy-classifier``,
    else the model's own, else the bundled one): it decides table3's samples, so a run with another one is
    refused."""
    from ..train.noisy_classifier import noisy_classifier_of

    return model_digest(str(args.noisy_classifier or noisy_classifier_of(args.model)))


def model_digest(model: str) -> str:
    """sha256 (16 hex digits) of a model folder's weights and configs (not ``training.json`` nor the
    ``classifier*`` folders of the feature extractors); the path itself for hub ids."""
    root = Path(model)
    if not root.exists():
        return f"path:{model}"
    files = (
        sorted(p for p in root.rglob("*") if p.is_file() and p.suffix in (".safetensors", ".bin", ".json"))
        if root.is_dir()
        else [root]
    )
    files = [  # the feature extractors (classifier, classifier-2, ...) do not decide the samples
        p
        for p in files
        if p.name != "training.json"
        and not (
            root.is_dir()
            and any(q.startswith(("classifier", "noisy_classifier")) for q in p.relative_to(root).parts)
        )
    ]
    h = hashlib.sha256()
    for p in files:
        h.update(str(p.relative_to(root) if root.is_dir() else p.name).encode())
        with open(p, "rb") as f:
            for block in iter(lambda f=f: f.read(1 << 20), b""):
                h.update(block)
    return h.hexdigest()[:16]


def eval_config(
    args: argparse.Namespace, names: Sequence[str], scales: Sequence[float], sigmas: Sequence[float]
) -> dict[str, Any]:
    """The ``config.json`` of a run: the options that decide its samples (:data:`SAMPLE_KEYS`; those of
    experiments not run are None) and the metric options (bootstrap, seed blocks, reference, second
    extractor: not sample keys, so a finished run's shards can be scored again with other statistics)."""
    model = Path(args.model)
    weak = bool({"cfg", "cost"} & set(names))  # the experiments with the ROW_TERMS' arms
    return {
        "schema": SCHEMA,
        "experiments": list(names),
        "num_samples": args.num_samples,
        "steps": args.steps,
        "scheduler": args.scheduler,
        "seed": args.seed,
        "batch_size": args.batch_size,
        "model": str(model.resolve()) if model.exists() else args.model,
        "model_digest": model_digest(args.model),
        "sag_scale": args.sag_scale,
        "cfg_scale": args.cfg_scale,
        "pag_scale": args.pag_scale,
        **{key: getattr(args, key) if weak else None for key in TERM_ROW_KEYS},
        "scales": list(scales) if "scale" in names else None,
        "sigmas": list(sigmas) if "sigma" in names else None,
        "calibration_samples": args.calibration_samples if {"masking", "cfg"} & set(names) else None,
        "sag_sigmas": list(dict.fromkeys(args.sag_sigmas)) if {"scale", "masking"} & set(names) else None,
        "classifier_scale": args.classifier_scale if "table3" in names else None,
        "noisy_classifier": noisy_classifier_digest(args) if "table3" in names else None,
        "cost_batch": args.cost_batch if "cost" in names else None,
        "bootstrap": args.bootstrap,
        "seed_blocks": args.seed_blocks,
        "num_reference": args.num_reference,
        "dataset": args.dataset,
        "reference_part": args.reference_part,
        "second_classifier": args.second_classifier,
    }


def config_digest(config: dict[str, Any]) -> str:
    """sha256 (16 hex digits) of ``config``'s :data:`SAMPLE_KEYS` as written to JSON: every shard and
    cache of a run records it, and a file recording another one is not used."""
    text = json.dumps({k: config.get(k) for k in SAMPLE_KEYS}, sort_keys=True)
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def check_config(folder: Path, config: dict[str, Any]) -> bool:
    """Compare ``config`` with ``folder/config.json``: True if it exists and matches on
    :data:`SAMPLE_KEYS`, False if there is none; SystemExit naming the differing keys otherwise."""
    path = folder / "config.json"
    if not path.exists():
        return False
    try:
        old = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError) as err:
        raise SystemExit(f"error: cannot read {path} ({err}); use another --out folder") from None
    diff = [
        f"{k}: {old.get(k)!r} (in the folder) != {config.get(k)!r} (now)"
        for k in SAMPLE_KEYS
        if old.get(k) != json.loads(json.dumps(config.get(k)))  # as written: tuples become lists
    ]
    if diff:
        raise SystemExit(
            f"error: {folder} holds an evaluation with a different configuration; differing keys: "
            + "; ".join(diff)
            + ". Use another --out (or --shard-dir) folder, or rerun with the original options."
        )
    return True
