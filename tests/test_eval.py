"""``attnguide eval`` (attnguide.apps.eval) on a tiny random 28x28 class-conditional UNet: every experiment
end to end, resume, configuration mismatch, files of another arm or damaged caches made again, and
2-process sharding with torchrun equal to 1 process."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

import attnguide.apps.eval as evaluate
from attnguide.apps.arms import Arm
from attnguide.apps.eval import Sampler, blur_kernel_for, build_experiments, load_model

EXPECTED_PNGS = {
    "table1": ["table1.png"],
    "scale": ["scale.png"],
    "masking": ["masking.png"],
    "sigma": ["sigma.png"],
    "cfg": ["cfg.png"],
    "table3": ["table3.png"],
    "window": ["window.png"],
    "cost": ["cost.png"],
}


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory) -> Path:
    """A bundled-layout model folder: tiny 1-channel 28x28 class-conditional UNet (11 labels, 10 = null),
    DDPM scheduler, and an untrained digit classifier."""
    from safetensors.torch import save_file

    from attnguide.apps.train import make_digit_classifier, make_mnist_scheduler, make_mnist_unet

    out = tmp_path_factory.mktemp("tiny-mnist")
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        unet = make_mnist_unet(block_out_channels=(8, 16, 16), attention_head_dim=8, norm_num_groups=4)
        clf = make_digit_classifier(width=8, feature_dim=16)
    unet.save_pretrained(out / "unet")
    make_mnist_scheduler().save_pretrained(out / "scheduler")
    (out / "model_index.json").write_text(
        json.dumps(
            {
                "_class_name": ["attnguide", "DDPMSAGPipeline"],
                "unet": ["diffusers", "UNet2DModel"],
                "scheduler": ["diffusers", "DDPMScheduler"],
            }
        )
    )
    (out / "classifier").mkdir()
    save_file(
        {k: v.contiguous() for k, v in clf.state_dict().items()},
        str(out / "classifier" / "model.safetensors"),
    )
    (out / "classifier" / "config.json").write_text(json.dumps({"architecture": clf.config}))
    return out


@pytest.fixture(autouse=True)
def _keep_threads():
    n = torch.get_num_threads()
    yield
    torch.set_num_threads(n)


def _args(model: Path, out: Path, experiment: str, *extra: str) -> list[str]:
    return [
        experiment,
        "--out",
        str(out),
        "--model",
        str(model),
        "--num-samples",
        "8",
        "--batch-size",
        "4",
        "--steps",
        "2",
        "--num-reference",
        "100",
        "--bootstrap",
        "3",
        "--calibration-samples",
        "4",
        "--cost-batch",
        "2",
        "--device",
        "cpu",
        "--threads",
        "1",
        "--quiet",
        *extra,
    ]


def _shards(folder: Path) -> dict[str, int]:
    return {str(p.relative_to(folder)): p.stat().st_mtime_ns for p in sorted(folder.rglob("shard_*.npz"))}


@pytest.mark.parametrize("experiment", evaluate.EXPERIMENTS)
def test_each_experiment_end_to_end(tiny_model, tmp_path, experiment):
    out = tmp_path / "eval"
    res = evaluate.run(_args(tiny_model, out, experiment))
    for name in ("report.md", "metrics.json", "metrics.csv", "config.json", *EXPECTED_PNGS[experiment]):
        assert (out / name).is_file(), name
    data = json.loads((out / "metrics.json").read_text())
    report = (out / "report.md").read_text()
    assert "Command: `attnguide eval" in report and "Samples per arm: **8**" in report
    assert "NOT comparable with published FIDs" in report
    assert "## Where SAG did not help" in report
    csv_lines = (out / "metrics.csv").read_text().splitlines()
    assert csv_lines[0].startswith("experiment,label,arm")
    if experiment == "cost":
        rows = data["cost"]["rows"]
        assert [r["method"] for r in rows][:3] == ["no guidance", "SAG", "blur guidance"]
        assert all(r["seconds"] > 0 for r in rows) and data["cost"]["memory_method"]
        assert len(csv_lines) == 1 + len(rows)
        return
    rows = data["experiments"][experiment]["rows"]
    assert len(csv_lines) == 1 + len(rows)
    for r in rows:
        assert np.isfinite(r["metrics"]["fid"]) and 0 <= r["metrics"]["precision"] <= 1
        assert r["num_samples"] == 8
    if experiment == "table1":
        assert [r["label"] for r in rows] == ["uncond", "uncond + SAG", "cond", "cond + SAG"]
        assert rows[2]["metrics"]["accuracy"] is not None  # conditional arms: class accuracy
        assert rows[1]["mask_fraction"] is not None and 0 < rows[1]["mask_fraction"] < 1
    if experiment == "scale":
        from attnguide.apps.eval.experiments import DEFAULT_SCALES

        assert [r["x"] for r in rows] == sorted({*DEFAULT_SCALES, 0.0})
    if experiment == "masking":
        frac = data["calibration"]["attention_mask_fraction"]
        assert 0 < frac <= 1
        random_row = next(r for r in rows if r["label"] == "random")
        assert random_row["spec"]["sag_fraction"] == pytest.approx(frac)
    if experiment == "sigma":
        assert rows[0]["arm"] == "u" and rows[-1]["spec"]["sag_average"]
    if experiment == "window":
        assert [r["arm"] for r in rows[:3]] == ["u", "u-sag0.75", "u-sag0.75-win0-0.5"]
        assert all(r["mask_fraction"] is not None and 0 < r["mask_fraction"] < 1 for r in rows[1:])
    assert res["experiments"][experiment]["rows"][0]["label"] == rows[0]["label"]


def test_resume_recomputes_only_the_missing_shard(tiny_model, tmp_path):
    out = tmp_path / "eval"
    first = evaluate.run(_args(tiny_model, out, "table1"))
    before = _shards(out / "shards")
    assert first["shards_written"] == len(before) == 4 * 2  # 4 arms x 2 shards of 4 samples
    victim = sorted(before)[3]
    (out / "shards" / victim).unlink()
    second = evaluate.run(_args(tiny_model, out, "table1"))
    after = _shards(out / "shards")
    assert second["shards_written"] == 1
    assert set(after) == set(before)
    changed = [k for k in before if after[k] != before[k]]
    assert changed == [victim]
    for r1, r2 in zip(
        first["experiments"]["table1"]["rows"], second["experiments"]["table1"]["rows"], strict=True
    ):
        assert r1["metrics"] == r2["metrics"] and r1.get("fid_delta_ci") == r2.get("fid_delta_ci")
    # a third run samples nothing
    assert evaluate.run(_args(tiny_model, out, "table1"))["shards_written"] == 0


def _same_metrics(a: dict, b: dict, experiment: str = "table1") -> None:
    rows_a, rows_b = a["experiments"][experiment]["rows"], b["experiments"][experiment]["rows"]
    for r1, r2 in zip(rows_a, rows_b, strict=True):
        assert r1["arm"] == r2["arm"]
        assert r1["metrics"] == r2["metrics"] and r1.get("fid_delta_ci") == r2.get("fid_delta_ci")


def test_files_of_another_arm_are_refused_and_made_again(tiny_model, tmp_path, capsys):
    """A valid shard (and feature cache) of arm ``u`` copied over those of ``u-sag0.75``: both refused
    with a warning naming the file, sampled / computed again; the metrics equal the clean run's."""
    from attnguide.apps.eval.config import config_digest

    out = tmp_path / "eval"
    clean = evaluate.run(_args(tiny_model, out, "table1"))
    shards = out / "shards"
    with np.load(shards / "u" / "shard_00001.npz") as z:  # what a shard records
        assert str(z["arm"]) == "u" and str(z["kind"]) == "shard" and list(z["indices"]) == [4, 5, 6, 7]
        config = json.loads((out / "config.json").read_text())
        assert str(z["config_digest"]) == config_digest(config)
    shard = shards / "u-sag0.75" / "shard_00001.npz"
    shutil.copyfile(shards / "u" / "shard_00001.npz", shard)
    (feats,) = (shards / "u-sag0.75").glob("features_*.npz")
    shutil.copyfile(shards / "u" / feats.name, feats)
    capsys.readouterr()
    again = evaluate.run(_args(tiny_model, out, "table1"))
    err = capsys.readouterr().err
    assert f"{shard} does not belong here: it records arm 'u', not 'u-sag0.75'" in err
    assert f"{feats} does not belong here" in err and "computing the features again" in err
    assert again["shards_written"] == 1
    _same_metrics(clean, again)
    with np.load(shard) as z, np.load(feats) as f:
        assert str(z["arm"]) == "u-sag0.75" and str(f["arm"]) == "u-sag0.75"


def test_damaged_caches_are_rebuilt_with_a_warning(tiny_model, tmp_path, capsys):
    """A truncated feature cache and reference cache: rebuilt, with a warning naming each file, and the
    metrics equal the clean run's (no shard is sampled again)."""
    out = tmp_path / "eval"
    clean = evaluate.run(_args(tiny_model, out, "table1"))
    (feats,) = (out / "shards" / "c").glob("features_*.npz")
    ref = out / "reference_features.npz"
    for path in (feats, ref):
        data = path.read_bytes()
        path.write_bytes(data[: len(data) // 2])
    capsys.readouterr()
    again = evaluate.run(_args(tiny_model, out, "table1"))
    err = capsys.readouterr().err
    assert f"cannot read {feats} (" in err and f"cannot read {ref} (" in err
    assert "computing the features again" in err and "computing the reference features again" in err
    assert again["shards_written"] == 0
    _same_metrics(clean, again)
    for path in (feats, ref):
        with np.load(path) as z:
            assert z["pool"].shape[0] == (8 if path == feats else 100)
    capsys.readouterr()
    evaluate.run(_args(tiny_model, out, "table1"))  # rebuilt files are used as they are
    assert "warning" not in capsys.readouterr().err


def test_damaged_cost_cache_is_timed_again(tiny_model, tmp_path, capsys):
    out = tmp_path / "eval"
    evaluate.run(_args(tiny_model, out, "cost"))
    path = out / "shards" / "cost.json"
    cached = json.loads(path.read_text())
    assert cached["kind"] == "cost" and cached["cost"]["rows"]
    path.write_text(path.read_text()[:40])
    capsys.readouterr()
    again = evaluate.run(_args(tiny_model, out, "cost"))
    assert f"cannot read {path} (JSONDecodeError" in capsys.readouterr().err
    assert json.loads(path.read_text())["cost"]["rows"] == again["cost"]["rows"]


def test_config_mismatch_is_refused(tiny_model, tmp_path):
    out = tmp_path / "eval"
    evaluate.run(_args(tiny_model, out, "table1"))
    with pytest.raises(SystemExit, match=r"differing keys: steps: 2 .* != 3"):
        evaluate.run([*_args(tiny_model, out, "table1"), "--steps", "3"])
    with pytest.raises(SystemExit, match="seed") as err:
        evaluate.run([*_args(tiny_model, out, "table1"), "--seed", "5", "--sag-scale", "0.5"])
    assert "sag_scale" in str(err.value)
    with pytest.raises(SystemExit, match="experiments"):
        evaluate.run(_args(tiny_model, out, "scale"))


def test_cli_dispatches_eval(tiny_model, tmp_path):
    from attnguide.apps.cli import main

    argv = _args(tiny_model, tmp_path / "e", "table1", "--num-samples", "4", "--seed-blocks", "2")
    assert main(["eval", *argv]) == 0
    assert (tmp_path / "e" / "report.md").is_file()


def test_inception_extractor_end_to_end(tiny_model, tmp_path):
    from test_metrics import _FakeInception

    path = tmp_path / "inception.pt"
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        torch.jit.script(_FakeInception(dim=24)).save(str(path))
    out = tmp_path / "eval"
    res = evaluate.run(_args(tiny_model, out, "table1", "--inception", str(path), "--num-reference", "20"))
    assert res["extractor"]["name"] == "inception-v3-torchscript"
    row = res["experiments"]["table1"]["rows"][0]
    assert row["metrics"]["sfid"] is None and row["metrics"]["is"] is not None
    assert "NOT comparable" not in (out / "report.md").read_text()


def test_two_processes_equal_one(tiny_model, tmp_path):
    one, two = tmp_path / "one", tmp_path / "two"
    evaluate.run(_args(tiny_model, one, "table1,masking"))
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore"}
    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        "--nproc_per_node",
        "2",
        "-m",
        "attnguide.apps.eval",
        *_args(tiny_model, two, "table1,masking"),
    ]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=170)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    s1, s2 = _shards(one / "shards"), _shards(two / "shards")
    m1 = json.loads((one / "metrics.json").read_text())
    arms = {r["arm"] for exp in ("table1", "masking") for r in m1["experiments"][exp]["rows"]}
    assert set(s1) == set(s2) and len(s1) == 2 * len(arms)  # every arm of both experiments: 2 shards
    for name in s1:
        a, b = np.load(one / "shards" / name), np.load(two / "shards" / name)
        np.testing.assert_allclose(a["images"], b["images"], rtol=0, atol=1e-6)
        np.testing.assert_array_equal(a["indices"], b["indices"])
    m2 = json.loads((two / "metrics.json").read_text())
    assert m2["environment"]["world_size"] == 2
    assert m1["calibration"] == m2["calibration"]
    for exp in ("table1", "masking"):
        for r1, r2 in zip(m1["experiments"][exp]["rows"], m2["experiments"][exp]["rows"], strict=True):
            assert r1["arm"] == r2["arm"]
            assert r1["metrics"]["fid"] == pytest.approx(r2["metrics"]["fid"], rel=1e-4, abs=1e-9)


# ------------------------------------------------------------------------------------------ units
def test_samples_do_not_depend_on_batching(tiny_model):
    unet, cfg = load_model(str(tiny_model), "cpu")
    s = Sampler(unet, cfg, "ddim", 2, 0, "cpu", 11)
    for arm in (Arm(), Arm(conditional=True, cfg_scale=2.0)):
        full, _ = s.sample(arm, range(4), 0)
        part, _ = s.sample(arm, range(2, 4), 1)
        np.testing.assert_allclose(full[2:], part, atol=1e-5)
    ddpm = Sampler(unet, cfg, "ddpm", 2, 0, "cpu", 11)  # stochastic scheduler: per-sample generators
    full, _ = ddpm.sample(Arm(), range(4), 0)
    part, _ = ddpm.sample(Arm(), range(3, 4), 1)
    np.testing.assert_allclose(full[3:], part, atol=1e-5)


def test_arm_keys_and_kernels():
    assert Arm(sag_scale=0.0, sag_mask="global", sag_sigma=3.0).key == "u"
    assert Arm(conditional=True, cfg_scale=1.5, sag_scale=0.75).key == "c-cfg1.5-sag0.75"
    assert Arm(sag_scale=-0.1).key == "u-sag-0.1"
    assert Arm(sag_scale=0.5, sag_window=(0.25, 1.0)).key == "u-sag0.5-win0.25-1"
    assert Arm(sag_scale=0.0, sag_window=(0.25, 1.0)).key == "u"
    for sigma, size in ((1, 28), (3, 28), (9, 28), (27, 28), (1e6, 16)):
        k = blur_kernel_for(sigma, size)
        assert k % 2 == 1 and k >= 9 and k // 2 < size
    assert blur_kernel_for(3, 28) == 19
    exps = build_experiments(
        ["table1", "cfg"],
        sag_scale=0.5,
        cfg_scale=2.0,
        pag_scale=1.0,
        scales=(),
        sigmas=(),
        image_size=28,
        conditional_model=False,
    )
    assert all(not e.arm.conditional for rows in exps.values() for e in rows)


def test_seg_tpg_slg_arms_rows_and_sampler(tiny_model):
    """The cfg experiment's SEG / TPG / SLG rows (alone vs uncond, with CFG vs CFG), their keys, and the
    sampler's terms: each changes the samples at scale 1 and reproduces them at scale 1e-6."""
    from attnguide.apps.eval.experiments import TermRows

    opts = dict(sag_scale=0.5, cfg_scale=2.0, pag_scale=1.0, scales=(), sigmas=(), image_size=28)
    rows = {e.label: e for e in build_experiments(["cfg"], **opts)["cfg"]}
    assert rows["SEG"].baseline == "uncond" and rows["CFG + TPG"].baseline == "CFG"
    assert rows["SEG"].arm.key == "u-seg1" and rows["CFG + SLG"].arm.key == "c-cfg2-slg1-win0-1"
    assert rows["TPG"].arm.terms == {"tpg"} and rows["CFG + SEG"].arm.terms == {"cfg", "seg"}
    assert Arm(seg_scale=2.0, seg_sigma=3.0).key == "u-seg2-sigma3"
    assert Arm(seg_scale=0.0, seg_sigma=3.0, slg_window=(0.0, 1.0)).key == "u"  # unused options reset
    none = build_experiments(["cfg"], **opts, weak=TermRows(scales={"seg": 0.0, "tpg": 0.0, "slg": 0.0}))
    assert not {"SEG", "TPG", "SLG", "CFG + SEG"} & {e.label for e in none["cfg"]}
    with pytest.raises(ValueError, match="seg_sigma"):
        Arm(seg_scale=1.0, seg_sigma=0.0)

    unet, cfg = load_model(str(tiny_model), "cpu")
    sampler = Sampler(unet, cfg, "ddim", 2, 0, "cpu", 11)
    plain, _ = sampler.sample(Arm(), range(2), 0)
    for field in ("seg_scale", "tpg_scale", "slg_scale"):
        extra = {"slg_window": (0.0, 1.0)} if field == "slg_scale" else {}
        guided, _ = sampler.sample(Arm(**{field: 5.0}, **extra), range(2), 0)
        tiny, _ = sampler.sample(Arm(**{field: 1e-6}, **extra), range(2), 0)
        assert np.abs(guided - plain).max() > 1e-4, field
        np.testing.assert_allclose(tiny, plain, atol=1e-5, err_msg=field)


def test_average_pixel_arm_blurs_to_the_mean_pixel(tiny_model):
    """sigma -> infinity: the arm's SAG term (the one the sampler uses) takes the engine's mean-pixel blur
    strategy, and the degraded input replaces x0_hat under the mask by each image's mean pixel."""
    from attnguide.engine.degrade import mean_pixel_blur
    from attnguide.engine.guidance import sag_degraded_input
    from attnguide.engine.parameterization import NoiseLevel

    arm = Arm(sag_scale=0.75, sag_average=True)
    assert arm.term("sag").blur is mean_pixel_blur
    assert Arm(sag_scale=0.75).term("sag").blur is None
    unet, cfg = load_model(str(tiny_model), "cpu")
    sag = Sampler(unet, cfg, "ddim", 2, 0, "cpu", 11).guider(arm, 0).terms["sag"]
    assert sag.blur is mean_pixel_blur

    g = torch.Generator().manual_seed(0)
    x, eps = torch.rand(2, 1, 8, 8, generator=g), torch.randn(2, 1, 8, 8, generator=g)
    mask = (torch.rand(2, 1, 8, 8, generator=g) > 0.5).float()
    abar = torch.tensor(0.6)
    level = NoiseLevel.variance_preserving(abar)
    got = sag_degraded_input(
        x, eps, level, "epsilon", mask, sag.blur_kernel_size, sag.blur_sigma, blur=sag.blur
    )
    x0 = (x - (1 - abar).sqrt() * eps) / abar.sqrt()
    mean = x0.mean(dim=(-2, -1), keepdim=True).expand_as(x0)
    expected = abar.sqrt() * (mask * mean + (1 - mask) * x0) + (1 - abar).sqrt() * eps
    torch.testing.assert_close(got, expected)
    blurred = sag_degraded_input(x, eps, level, "epsilon", mask, sag.blur_kernel_size, sag.blur_sigma)
    assert not torch.allclose(got, blurred)  # the Gaussian blur would give something else
