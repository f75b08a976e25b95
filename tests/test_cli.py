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
    assert [c["name"] for c in meta["columns"]] == ["none", "sag", "blur", "pag", "cfg", "cfg+sag"]
    assert meta["class_labels"] == [0, 1]
    grid = Image.open(out / "samples.png")
    assert grid.width > 6 * 16 and grid.height > 2 * 16
    assert not list(out.glob(".*tmp*"))  # no temporary files left behind


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
