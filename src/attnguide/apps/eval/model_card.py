"""``attnguide eval model``: what a trained class-conditional model does before any guidance method is
compared on it, recorded in ``OUT/``: its loss curve (``loss.png``, from ``training.json``), samples at
several CFG weights (``samples.png``: one column per weight, the same seeds in every column, one row per
class), and the accuracy of its conditional samples at each weight as judged by its feature classifier
(``MODEL/classifier``), with a 95 % Wilson interval and per class (``metrics.json``, ``report.md``).

Sample ``i`` starts from seed ``seed + i`` with label ``i mod classes`` at every weight (paired); a
weight of 1 is the conditional model without CFG. Each weight's predictions are kept in
``OUT/predictions-<digest>.npz``, so a run cut short resumes and a larger ``--num-samples`` extends it.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import math
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ..arms import Arm
from ..files import write_atomic, write_json_atomic, write_text_atomic
from ..images import make_grid, to_uint8
from ..train.datasets import model_class_names
from .config import model_digest
from .features import DigitClassifierExtractor
from .sampler import Sampler, load_model

__all__ = ["DEFAULT_WEIGHTS", "ModelCard", "wilson_interval"]

#: The CFG weights sampled by default (1: no CFG).
DEFAULT_WEIGHTS = (1.0, 1.5, 2.0, 3.0, 4.0, 6.0)
BATCH = 100


def wilson_interval(hits: int, n: int, z: float = 1.959964) -> tuple[float, float]:
    """The Wilson score interval of a proportion ``hits / n`` (95 % by default)."""
    if n == 0:
        return (math.nan, math.nan)
    p = hits / n
    centre = (p + z * z / (2 * n)) / (1 + z * z / n)
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / (1 + z * z / n)
    return (max(0.0, centre - half), min(1.0, centre + half))


class ModelCard:
    """One ``attnguide eval model`` run (see the module text)."""

    def __init__(self, args: argparse.Namespace, device: str, log: Callable[[str], None]):
        self.args, self.device, self.log = args, device, log
        self.out = Path(args.out)
        unet, sched_config = load_model(args.model, device)
        self.classes = (unet.config.num_class_embeds or 0) - 1
        if self.classes < 1:
            raise SystemExit("error: --model: `attnguide eval model` needs a class-conditional model")
        self.sampler = Sampler(
            unet, sched_config, args.scheduler, args.steps, args.seed, device, unet.config.num_class_embeds
        )
        folder = Path(args.classifier) if args.classifier else Path(args.model) / "classifier"
        self.classifier = DigitClassifierExtractor(folder, device=device)

    def _file(self, weight: float) -> Path:
        a = self.args
        key = json.dumps(
            [model_digest(a.model), self.classifier.identity, a.scheduler, a.steps, a.seed, weight]
        )
        return self.out / f"predictions-{hashlib.sha256(key.encode()).hexdigest()[:12]}.npz"

    def predictions(self, weight: float) -> tuple[np.ndarray, np.ndarray]:
        """(labels, predicted labels) of the first ``--num-samples`` samples at CFG weight ``weight``,
        sampling only those not in the weight's file yet."""
        path, n = self._file(weight), self.args.num_samples
        have = np.load(path)["predicted"] if path.exists() else np.zeros(0, dtype=np.int64)
        arm = Arm(conditional=True, cfg_scale=None if weight == 1.0 else weight)
        parts = [have]
        for start in range(len(have), n, BATCH):
            indices = list(range(start, min(n, start + BATCH)))
            images, _ = self.sampler.sample(arm, indices, shard=0)
            logits = self.classifier(torch.from_numpy(images))["logits"]
            parts.append(logits.argmax(dim=1).numpy().astype(np.int64))
            done = np.concatenate(parts)
            write_atomic(path, lambda p, d=done: np.savez(p, predicted=d))
            self.log(f"cfg {weight:g}: {len(done)}/{n} samples")
        predicted = np.concatenate(parts)[:n]
        return np.arange(n) % self.classes, predicted

    def grid(self, weights: Sequence[float], per_class: int = 1) -> None:
        """``samples.png``: one column per weight, one row per class (the first samples of each)."""
        indices = list(range(self.classes * per_class))
        columns = {}
        for w in weights:
            arm = Arm(conditional=True, cfg_scale=None if w == 1.0 else w)
            images, _ = self.sampler.sample(arm, indices, shard=0)
            columns["no CFG" if w == 1.0 else f"CFG {w:g}"] = to_uint8(images.transpose(0, 2, 3, 1))
        names = model_class_names(self.args.model) or [str(i) for i in range(self.classes)]
        rows = [names[i % self.classes] for i in indices]
        image = make_grid(columns, scale=3, row_labels=rows)
        write_atomic(self.out / "samples.png", lambda p: image.save(p, format="PNG"))

    def run(self) -> dict[str, Any]:
        """Sample, classify, plot and write ``metrics.json`` and ``report.md``; returns the record."""
        self.out.mkdir(parents=True, exist_ok=True)
        weights = self.args.weights
        rows = []
        for w in weights:
            labels, predicted = self.predictions(w)
            hits = int((labels == predicted).sum())
            per_class = [
                float((predicted[labels == c] == c).mean()) if (labels == c).any() else None
                for c in range(self.classes)
            ]
            rows.append(
                {
                    "cfg_weight": w,
                    "samples": len(labels),
                    "accuracy": hits / len(labels),
                    "interval_95": list(wilson_interval(hits, len(labels))),
                    "per_class": per_class,
                }
            )
        self.grid(weights)
        record = self._record(rows)
        write_json_atomic(self.out / "metrics.json", record)
        write_text_atomic(self.out / "report.md", report_text(record))
        _loss_plot(record["training"].get("loss_curve"), self.out / "loss.png")
        return record

    def _record(self, rows: list[dict[str, Any]]) -> dict[str, Any]:
        a = self.args
        training_path = Path(a.model) / "training.json"
        training = json.loads(training_path.read_text(encoding="utf-8")) if training_path.exists() else {}
        classifier_config = (self.classifier.folder or Path()) / "config.json"
        classifier = (
            json.loads(classifier_config.read_text(encoding="utf-8")) if classifier_config.exists() else {}
        )
        return {
            "command": a.command,
            "model": a.model,
            "model_digest": model_digest(a.model),
            "classifier": self.classifier.identity,
            "classifier_validation_accuracy": classifier.get("held_out_accuracy"),
            "sampler": {"scheduler": a.scheduler, "steps": a.steps, "seed": a.seed},
            "rows": rows,
            "training": {
                k: training.get(k)
                for k in (
                    "steps",
                    "batch_size",
                    "lr",
                    "label_dropout",
                    "ema_decay",
                    "final_loss",
                    "wall_time_s",
                    "threads",
                    "dataset",
                    "parameters",
                    "loss_curve",
                    "command",
                )
            },
        }


def report_text(record: dict[str, Any]) -> str:
    """``report.md`` of a model card record."""
    t, s = record["training"], record["sampler"]
    lines = [
        "# The trained model",
        "",
        f"`{record['command']}`",
        "",
        f"Model `{record['model']}` (digest {record['model_digest']}): {t.get('parameters')} parameters, "
        f"{t.get('steps')} training steps at batch {t.get('batch_size')} on {t.get('dataset')}; final loss "
        f"{_fmt(t.get('final_loss'))} (mean epsilon-MSE of the last 200 steps); training wall time "
        f"{_fmt((t.get('wall_time_s') or 0) / 3600, 2)} h on {t.get('threads')} thread(s). Loss curve: "
        "`loss.png`. Samples at each weight: `samples.png` (same seeds in every column).",
        "",
        f"Accuracy of conditional samples ({s['scheduler']}, {s['steps']} steps, seeds from {s['seed']}), "
        f"judged by the model's feature classifier ({record['classifier']}; validation accuracy "
        f"{_fmt(record['classifier_validation_accuracy'])} on held-out real images):",
        "",
        "| CFG weight | samples | accuracy | 95 % interval (Wilson) | lowest class |",
        "|---|---|---|---|---|",
    ]
    for r in record["rows"]:
        sampled = [(acc, c) for c, acc in enumerate(r["per_class"]) if acc is not None]
        low = min(sampled)[1]
        w = "1 (no CFG)" if r["cfg_weight"] == 1.0 else f"{r['cfg_weight']:g}"
        lo, hi = r["interval_95"]
        lines.append(
            f"| {w} | {r['samples']} | {r['accuracy']:.3f} | [{lo:.3f}, {hi:.3f}] | "
            f"{low}: {r['per_class'][low]:.3f} |"
        )
    return "\n".join(lines) + "\n"


def _fmt(value: Any, digits: int = 4) -> str:
    return "n/a" if value is None else f"{value:.{digits}g}" if isinstance(value, float) else str(value)


def _loss_plot(curve: Sequence[Sequence[float]] | None, path: Path) -> None:
    """``loss.png``: the training loss curve (``training.json``'s ``loss_curve``), where there is one."""
    if not curve:
        return
    from matplotlib.figure import Figure

    fig = Figure(figsize=(6, 3.5))
    ax = fig.subplots()
    steps, losses = zip(*curve, strict=True)
    ax.plot(steps, losses)
    ax.set_xlabel("training step")
    ax.set_ylabel("epsilon-MSE (bin mean)")
    ax.set_yscale("log")
    ax.grid(alpha=0.3)
    fig.tight_layout()
    write_atomic(path, lambda p: fig.savefig(p, format="png", dpi=120))
