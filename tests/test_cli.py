"""`attnguide sample` end to end into a temporary folder, with a tiny pipeline saved by the test."""

from __future__ import annotations

import json

import pytest
from diffusers import DDPMScheduler
from PIL import Image

from attnguide import DDPMSAGPipeline, StableDiffusionSAGPipeline
from attnguide.apps.cli import main
from attnguide.tiny_models import tiny_sd_components, tiny_unet_2d


@pytest.fixture(scope="module")
def tiny_pixel_dir(tmp_path_factory):
    path = tmp_path_factory.mktemp("pixel")
    DDPMSAGPipeline(tiny_unet_2d(0, class_conditional=True), DDPMScheduler()).save_pretrained(path)
    return path


def _run(*args: str) -> int:
    return main(["sample", "--quiet", "--steps", "3", "--num-images", "2", *args])


def test_sample_writes_grid_masks_and_metadata(tiny_pixel_dir, tmp_path, capsys):
    out = tmp_path / "run"
    assert _run("--model", str(tiny_pixel_dir), "--out", str(out)) == 0
    printed = capsys.readouterr().out
    for name in ("samples.png", "masks.png", "samples.json"):
        assert (out / name).exists() and f"wrote {out / name}" in printed
    meta = json.loads((out / "samples.json").read_text())
    names = ["none", "sag", "blur", "pag", "seg", "tpg", "slg", "cfg", "cfg+sag"]
    assert [c["name"] for c in meta["columns"]] == names
    assert meta["class_labels"] == [0, 1]
    grid = Image.open(out / "samples.png")
    assert grid.width > len(names) * 16 and grid.height > 2 * 16
    assert not list(out.glob(".*tmp*"))  # no temporary files left behind


def test_sample_columns_of_seg_tpg_and_slg_follow_their_flags(tiny_pixel_dir, tmp_path):
    """Each new term's column runs at its flag's scale and samples.json records the scales (SEG's sigma
    inf as null); a run that changes only --seg-scale changes only the seg column."""
    import numpy as np

    methods = "none,seg,tpg,slg"

    def grid(out, seg_scale):
        args = ["--model", str(tiny_pixel_dir), "--out", str(out), "--methods", methods]
        assert _run(*args, "--seg-scale", seg_scale, "--tpg-scale", "1", "--slg-scale", "2") == 0
        return np.asarray(Image.open(out / "samples.png")), json.loads((out / "samples.json").read_text())

    on, meta = grid(tmp_path / "on", "5")
    cols = {c["name"]: c for c in meta["columns"]}
    assert cols["seg"]["seg_scale"] == 5 and cols["seg"]["seg_sigma"] is None
    assert cols["seg"]["tpg_scale"] == 0
    assert cols["tpg"]["tpg_scale"] == 1 and cols["slg"]["slg_scale"] == 2
    assert cols["slg"]["slg_window"] == [0.01, 0.2] and cols["none"]["seg_scale"] == 0
    off, meta = grid(tmp_path / "off", "0")
    assert {c["name"]: c for c in meta["columns"]}["seg"]["seg_scale"] == 0
    changed = np.nonzero((on != off).any(axis=(0, 2)))[0]  # x positions that differ
    assert changed.size and changed.max() - changed.min() < on.shape[1] / len(methods.split(","))


def test_sample_refuses_to_overwrite(tiny_pixel_dir, tmp_path):
    out = tmp_path / "run"
    assert _run("--model", str(tiny_pixel_dir), "--out", str(out), "--methods", "none,sag") == 0
    before = (out / "samples.png").read_bytes()
    with pytest.raises(SystemExit, match="--overwrite"):
        _run("--model", str(tiny_pixel_dir), "--out", str(out), "--methods", "none,sag", "--seed", "1")
    assert (out / "samples.png").read_bytes() == before
    assert (
        _run(
            "--model",
            str(tiny_pixel_dir),
            "--out",
            str(out),
            "--methods",
            "none,sag",
            "--seed",
            "1",
            "--overwrite",
        )
        == 0
    )
    assert (out / "samples.png").read_bytes() != before


def test_sample_with_a_stable_diffusion_pipeline_folder(tmp_path):
    model = tmp_path / "sd"
    StableDiffusionSAGPipeline(**tiny_sd_components(0)).save_pretrained(model)
    out = tmp_path / "run"
    assert (
        _run(
            "--model",
            str(model),
            "--out",
            str(out),
            "--prompt",
            "a cat",
            "--methods",
            "none,sag,pag,cfg+sag",
            "--scheduler",
            "euler",
        )
        == 0
    )
    meta = json.loads((out / "samples.json").read_text())
    assert [c["name"] for c in meta["columns"]] == ["none", "sag", "pag", "cfg+sag"]


def test_sample_with_a_bare_unet_folder(tmp_path):
    model = tmp_path / "unet"
    tiny_unet_2d(0).save_pretrained(model)
    out = tmp_path / "run"
    assert _run("--model", str(model), "--out", str(out), "--methods", "none,sag,cfg") == 0
    meta = json.loads((out / "samples.json").read_text())
    assert [c["name"] for c in meta["columns"]] == ["none", "sag"]  # cfg needs a class-conditional model


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--methods", "none,magic"], "unknown"),
        (["--sag-scale", "-1"], "--sag-scale"),
        (["--steps", "0"], "--steps"),
        (["--class-label", "12"], "--class-label"),
        (["--model", "/nonexistent/model"], "--model"),
    ],
)
def test_sample_bad_arguments(tiny_pixel_dir, tmp_path, args, message):
    base = ["--model", str(tiny_pixel_dir)] if "--model" not in args else []
    with pytest.raises(SystemExit, match=message):
        _run(*base, "--out", str(tmp_path / "x"), *args)
    assert not (tmp_path / "x" / "samples.png").exists()


def test_cli_help(capsys):
    with pytest.raises(SystemExit) as exc:
        main(["sample", "--help"])
    assert exc.value.code == 0
    assert "--sag-scale" in capsys.readouterr().out
