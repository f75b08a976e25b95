"""The evidence issue on the CPU: the IDX reader and Fashion-MNIST loading, the split's disjointness, the
bootstrap that resamples the reference too, the shard-by-shard arm order, and `attnguide eval primary`
end to end on a tiny model and a tiny Fashion-MNIST folder, extended to more samples."""

from __future__ import annotations

import gzip
import json
import struct
from pathlib import Path

import numpy as np
import pytest
import torch

from attnguide.apps.arms import Arm
from attnguide.apps.eval.metrics import FrechetToReference, gaussian_stats, precision_recall
from attnguide.apps.eval.primary import PRIMARY, primary_arms, sampling_tasks, shard_digest
from attnguide.apps.eval.resampling import bootstrap_draws, resampled_metrics
from attnguide.apps.train.datasets import load_fashion_mnist, load_split, read_idx


def _write_idx(path: Path, array: np.ndarray, compress: bool) -> None:
    """An IDX file (magic 0 0 0x08 ndim, big-endian sizes, uint8 data), gzipped or not."""
    raw = bytes([0, 0, 0x08, array.ndim]) + b"".join(struct.pack(">I", n) for n in array.shape)
    raw += np.ascontiguousarray(array, dtype=np.uint8).tobytes()
    if compress:
        path = path.with_name(path.name + ".gz")
        path.write_bytes(gzip.compress(raw))
    else:
        path.write_bytes(raw)


def fashion_folder(root: Path, n_train: int = 40, n_test: int = 20, seed: int = 0) -> Path:
    """A folder of the four Fashion-MNIST IDX files with random images (train files gzipped, test not)."""
    rng = np.random.default_rng(seed)
    root.mkdir(parents=True, exist_ok=True)
    for stem, n, gz in (("train", n_train, True), ("t10k", n_test, False)):
        _write_idx(root / f"{stem}-images-idx3-ubyte", rng.integers(0, 256, (n, 28, 28)), gz)
        _write_idx(root / f"{stem}-labels-idx1-ubyte", np.arange(n) % 10, gz)
    return root


def test_idx_reader_and_fashion_loading(tmp_path):
    folder = fashion_folder(tmp_path / "fmnist")
    labels = read_idx(folder / "t10k-labels-idx1-ubyte")
    assert labels.dtype == np.uint8 and labels.tolist() == [i % 10 for i in range(20)]
    raw = read_idx(folder / "train-images-idx3-ubyte.gz")
    assert raw.shape == (40, 28, 28)
    images, y = load_fashion_mnist(folder, "train")
    assert images.shape == (40, 1, 28, 28) and images.dtype == torch.float32 and y.dtype == torch.int64
    torch.testing.assert_close(images[:, 0], torch.from_numpy(raw.astype(np.float32)) / 127.5 - 1)
    bad = tmp_path / "bad"
    bad.write_bytes(b"\x00\x01\x08\x01" + struct.pack(">I", 3) + b"\x00\x00\x00")
    with pytest.raises(ValueError, match="not an IDX file"):
        read_idx(bad)
    short = tmp_path / "short"
    short.write_bytes(b"\x00\x00\x08\x01" + struct.pack(">I", 5) + b"\x00")
    with pytest.raises(ValueError, match="data bytes"):
        read_idx(short)
    with pytest.raises(FileNotFoundError, match="dataset-fashion-mnist"):
        load_fashion_mnist(tmp_path / "nowhere")


def test_fashion_split_is_disjoint_and_recorded(tmp_path):
    """The train part (what models and extractors train on) and the held-out part (the reference) are
    the two files: disjoint, their digests recorded, the same for the same files."""
    folder = fashion_folder(tmp_path / "fmnist")
    split = load_split("fashion-mnist", folder)
    assert len(split.train_images) == 40 and len(split.held_out_images) == 20
    flat_train = {tuple(x.flatten().tolist()) for x in split.train_images}
    assert not any(tuple(x.flatten().tolist()) in flat_train for x in split.held_out_images)
    rec = split.record
    assert rec["part"] == "train" and rec["train_size"] == 40 and rec["held_out_size"] == 20
    assert rec["train_digest"] != rec["held_out_digest"]
    assert load_split("fashion-mnist", folder).record == rec
    other = load_split("fashion-mnist", fashion_folder(tmp_path / "other", seed=1)).record
    assert other["train_digest"] != rec["train_digest"]


def test_bootstrap_resamples_the_reference_too():
    """Each replicate: the same sample draw for every arm, one reference draw for every arm; the FID,
    precision and recall of a replicate equal the metrics recomputed on the drawn rows by hand (the
    radii of the full sets); an identity draw gives the full-set metrics."""
    rng = np.random.default_rng(0)
    ref = {"pool": rng.normal(size=(60, 4))}
    feats = {name: {"pool": rng.normal(loc=shift, size=(30, 4))} for name, shift in (("a", 0.0), ("b", 0.5))}
    samples, reference = bootstrap_draws(30, 60, 3, seed=1)
    assert samples.shape == (3, 30) and reference.shape == (3, 60)
    again = bootstrap_draws(30, 60, 3, seed=1)
    assert np.array_equal(again[0], samples) and np.array_equal(again[1], reference)
    assert not np.array_equal(reference[0], np.arange(60))  # the reference is resampled
    out = resampled_metrics(feats, ref, (samples, reference))
    for name in ("a", "b"):
        for r in range(3):
            f, q = feats[name]["pool"][samples[r]], ref["pool"][reference[r]]
            want = FrechetToReference(gaussian_stats(q))(f)
            assert out[name]["fid"][r] == pytest.approx(want, rel=1e-9)
    ident = (np.arange(30)[None], np.arange(60)[None])
    full = resampled_metrics(feats, ref, ident)
    p, rc = precision_recall(ref["pool"], feats["a"]["pool"])
    assert full["a"]["precision"][0] == pytest.approx(p) and full["a"]["recall"][0] == pytest.approx(rc)
    # a reference draw that keeps one half: recall counts those images only, by multiplicity
    half = np.repeat(np.arange(30), 2)[None]
    one = resampled_metrics(feats, ref, (np.arange(30)[None], half))
    from attnguide.apps.eval.metrics import ball_membership, knn_radii

    covered = ball_membership(ref["pool"], feats["a"]["pool"], knn_radii(feats["a"]["pool"], 3, squared=True))
    assert one["a"]["recall"][0] == pytest.approx(float(covered.any(1)[:30].double().mean()))


def test_arms_are_sampled_shard_by_shard_and_the_digest_ignores_the_sample_count():
    arms = [Arm(), Arm(sag_scale=0.1), Arm(conditional=True)]
    tasks = sampling_tasks(arms, 3)
    assert [(a.key, j) for a, j in tasks[:4]] == [("u", 0), ("u-sag0.1", 0), ("c", 0), ("u", 1)]
    assert [j for _, j in tasks] == [0, 0, 0, 1, 1, 1, 2, 2, 2]
    cfg = {"protocol": "p", "num_samples": 100, "bootstrap": 10, "seed_blocks": 5, "steps": 20}
    assert shard_digest(cfg) == shard_digest({**cfg, "num_samples": 4000, "bootstrap": 1000})
    assert shard_digest(cfg) != shard_digest({**cfg, "steps": 50})


def test_primary_arms_and_comparisons_are_the_protocols():
    """The arms and the ten comparisons of docs/evaluation.md."""
    arms = primary_arms(28)
    assert len(PRIMARY) == 10 and all(c.a in arms and set(c.b) <= set(arms) for c in PRIMARY)
    assert arms["u + SAG"] == Arm(sag_scale=0.1, sag_sigma=3.0, sag_kernel=19)
    assert arms["u + blur"].sag_mask == "global" and arms["u, 2x steps"].steps_multiplier == 2
    assert arms["u + SLG"].slg_window == (0.0, 1.0) and arms["u + TPG"].tpg_scale == 0.2
    assert {arms[b].cfg_scale for b in PRIMARY[5].b} == {1.25, 1.5, 2.0, 3.0}
    doc = (Path(__file__).parents[1] / "docs" / "evaluation.md").read_text()
    for c in PRIMARY:
        assert f"| {c.id} |" in doc


@pytest.fixture(scope="module")
def tiny_fashion_model(tmp_path_factory) -> Path:
    """A tiny class-conditional model folder with untrained classifiers and a training record naming the
    Fashion-MNIST split of the tiny data folder beside it."""
    from safetensors.torch import save_file

    from attnguide.apps.train import make_digit_classifier, make_mnist_scheduler, make_mnist_unet

    root = tmp_path_factory.mktemp("tiny-fashion")
    data = fashion_folder(root / "data")
    out = root / "model"
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        unet = make_mnist_unet(block_out_channels=(8, 16, 16), attention_head_dim=8, norm_num_groups=4)
        classifiers = {"classifier": make_digit_classifier(width=8, feature_dim=16)}
        classifiers["classifier-2"] = make_digit_classifier(width=8, feature_dim=12)
    unet.save_pretrained(out / "unet")
    make_mnist_scheduler().save_pretrained(out / "scheduler")
    index = {
        "_class_name": ["attnguide", "DDPMSAGPipeline"],
        "unet": ["diffusers", "UNet2DModel"],
        "scheduler": ["diffusers", "DDPMScheduler"],
    }
    (out / "model_index.json").write_text(json.dumps(index))
    split = load_split("fashion-mnist", data).record
    (out / "training.json").write_text(json.dumps({"steps": 3, "final_loss": 0.5, "data_split": split}))
    for name, clf in classifiers.items():
        (out / name).mkdir()
        save_file(
            {k: v.contiguous() for k, v in clf.state_dict().items()}, str(out / name / "model.safetensors")
        )
        record = {"architecture": clf.config, "data_split": split}
        (out / name / "config.json").write_text(json.dumps(record))
    return root


def test_primary_run_end_to_end_and_its_extension(tiny_fashion_model, tmp_path):
    """`attnguide eval primary` on the tiny model: every arm sampled, the ten comparisons with corrected
    intervals and verdicts, the reference held out for the model and both extractors; a second run with
    more samples extends every arm and samples only the new shards."""
    from attnguide.apps.eval.cli import run

    out = tmp_path / "run"
    args = [
        "primary",
        "--dataset",
        "fashion-mnist",
        "--data-dir",
        str(tiny_fashion_model / "data"),
        "--model",
        str(tiny_fashion_model / "model"),
        "--out",
        str(out),
        "--num-samples",
        "8",
        "--batch-size",
        "4",
        "--scheduler",
        "dpm",
        "--steps",
        "2",
        "--bootstrap",
        "6",
        "--seed-blocks",
        "2",
        "--sfid-bootstrap",
        "2",
        "--threads",
        "1",
        "--quiet",
    ]
    first = run(args)
    assert first["config"]["dataset"] == "fashion-mnist" and first["config"]["resample_reference"] is True
    assert len(first["arms"]) == 15 and first["shards_written"] == 15 * 2 + 2 * 2
    for p in first["primary"]:
        assert p["fid"]["verdict"] in ("better", "worse", "not resolved")
        lo, hi = p["fid"]["ci_corrected"]
        assert lo <= p["fid"]["delta"] <= hi and len(p["fid"]["blocks"]) == 2
    ref = first["reference"]
    assert ref["count"] == 20 and ref["held_out_for_model"]["held_out"] is True
    assert all(s["held_out"] for s in ref["held_out_for_extractors"].values())
    assert len(ref["held_out_for_extractors"]) == 2
    report = (out / "report.md").read_text()
    assert "| P6 | c + SAG | best of CFG 1.25, CFG, CFG 2, CFG 3 |" in report and "**" in report
    json.loads((out / "metrics.json").read_text())  # strict JSON
    second = run([*args[:10], "12", *args[11:]])  # --num-samples 12
    # one new shard per arm, and one per DDIM-check arm (its seeds are the first 1000: here all of them)
    assert second["shards_written"] == 15 + 2
    assert second["config"]["num_samples"] == 12 and second["statistics"]["block_sizes"] == [6, 6]


def test_wilson_interval_matches_the_formula():
    from attnguide.apps.eval.model_card import wilson_interval

    lo, hi = wilson_interval(8, 10)  # the textbook case: 0.8 of 10 -> [0.490, 0.943]
    assert abs(lo - 0.4902) < 1e-3 and abs(hi - 0.9433) < 1e-3
    assert wilson_interval(0, 5)[0] == 0.0 and wilson_interval(5, 5)[1] == 1.0


def test_model_card_samples_classifies_and_resumes(tiny_fashion_model, tmp_path):
    """`attnguide eval model`: accuracy per CFG weight with its interval, the sample grid, and a second
    run with more samples that samples only the new ones."""
    from attnguide.apps.eval.cli import run

    out = tmp_path / "card"
    args = [
        "model",
        "--model",
        str(tiny_fashion_model / "model"),
        "--out",
        str(out),
        "--num-samples",
        "6",
        "--cfg-weights",
        "1,2",
        "--steps",
        "2",
        "--scheduler",
        "dpm",
        "--threads",
        "1",
        "--quiet",
    ]
    first = run(args)
    assert [r["cfg_weight"] for r in first["rows"]] == [1.0, 2.0]
    for r in first["rows"]:
        lo, hi = r["interval_95"]
        assert r["samples"] == 6 and lo <= r["accuracy"] <= hi and len(r["per_class"]) == 10
    assert (out / "samples.png").exists() and "| 1 (no CFG) | 6 |" in (out / "report.md").read_text()
    files = sorted(out.glob("predictions-*.npz"))
    before = {f: np.load(f)["predicted"] for f in files}
    second = run([*args[:6], "9", *args[7:]])
    assert all(r["samples"] == 9 for r in second["rows"])
    for f, old in before.items():  # the first six predictions are kept, three more appended
        new = np.load(f)["predicted"]
        assert len(new) == 9 and (new[:6] == old).all()
