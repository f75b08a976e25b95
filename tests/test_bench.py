"""attnguide bench: the command runs, writes the documented JSON, and refuses bad input (no timing
assertions: performance is measured by the command, not asserted here)."""

from __future__ import annotations

import json

import pytest
import torch
from conftest import quiet

from attnguide.apps import bench
from attnguide.engine.step import Guider
from attnguide.tiny_models import tiny_sd_components


def test_tiny_bench_writes_every_requested_section(tmp_path):
    out = tmp_path / "b.json"
    args = ["--preset", "tiny", "--out", str(out), "--steps", "2", "--repeats", "1", "--warmup", "0"]
    args += ["--arms", "none,cfg+sag,pag,seg,cfg+tpg", "--map-memory"]
    args += ["--profile-dir", str(tmp_path / "prof")]
    assert bench.main(args) == 0
    data = json.loads(out.read_text())
    assert set(data["arms"]) == {"none", "cfg+sag", "pag", "seg", "cfg+tpg"}
    # model passes, counted: SAG's input differs (a second call), PAG / SEG / TPG are row blocks of one
    expected = {"none": (1, 1), "cfg+sag": (2, 3), "pag": (1, 2), "seg": (1, 2), "cfg+tpg": (1, 3)}
    passes = data["passes"]
    assert {k: (v["calls_per_step"], v["batches_per_step"]) for k, v in passes.items()} == expected
    assert passes["none"]["time_vs_none"] == 1 and passes["seg"]["time_vs_none"] > 0
    for name in ("seg", "cfg+tpg"):  # no diffusers pipeline to time against
        assert data["arms"][name]["diffusers_s"] is None and data["arms"][name]["ratio"] is None
    for row in (data["arms"][k] for k in ("none", "cfg+sag", "pag")):
        assert row["diffusers_s"] > 0 and row["attnguide_s"] > 0
        assert row["ratio"] == pytest.approx(row["attnguide_s"] / row["diffusers_s"], rel=1e-2)
    assert data["steps"] == 2 and data["preset"] == "tiny" and data["compile"] is None
    mm = data["map_memory"]
    assert set(mm) == {"mid_block", "largest_layer_memory_flat", "largest_layer_exact"}
    assert 0 < mm["mid_block"]["tokens"] <= mm["largest_layer_memory_flat"]["tokens"]
    for impl in ("diffusers", "attnguide"):
        assert (tmp_path / "prof" / f"profile-cfg_sag-{impl}.txt").is_file()
        assert data["profile"][impl]["ops_launched"] > 0
    # an existing output is never replaced silently
    with pytest.raises(SystemExit, match="exists"):
        bench.main(args)


@pytest.mark.parametrize(
    ("extra", "message"),
    [(["--arms", "cfg,nope"], "unknown"), (["--batch-size", "0"], "batch-size")],
)
def test_bench_rejects_bad_arguments(tmp_path, extra, message):
    with pytest.raises(SystemExit, match=message):
        bench.main(["--preset", "tiny", "--out", str(tmp_path / "x.json"), *extra])
    assert not (tmp_path / "x.json").exists()


def test_cuda_graphs_are_off_where_the_model_has_hooks():
    comps = tiny_sd_components(0)
    unet = comps["unet"]
    assert Guider(unet, comps["scheduler"], cuda_graphs=True).graphs is not None
    assert Guider(unet, comps["scheduler"], cuda_graphs=False).graphs is None
    handle = unet.mid_block.register_forward_pre_hook(lambda *a: None)
    try:
        assert Guider(unet, comps["scheduler"], cuda_graphs=True).graphs is None
    finally:
        handle.remove()


def test_cpu_run_ignores_cuda_graphs_setting():
    from attnguide import StableDiffusionSAGPipeline

    pipe = quiet(StableDiffusionSAGPipeline(**tiny_sd_components(0)))
    kw = dict(prompt="a cat", height=32, width=32, num_inference_steps=3, output_type="latent")
    pipe.cuda_graphs = True
    a = pipe(generator=torch.Generator().manual_seed(0), **kw).images
    pipe.cuda_graphs = False
    b = pipe(generator=torch.Generator().manual_seed(0), **kw).images
    assert torch.equal(a, b)


def test_compile_path_counts_no_recompilation():
    """The --compile path (here with dynamo's eager backend, so no C++ toolchain is needed): attnguide's
    UNet compiled in place after diffusers' eager runs; nothing is compiled after the warm-up."""
    from torch._dynamo.utils import counters

    before = counters["stats"]["unique_graphs"]
    data = bench.run_benchmark(
        "tiny",
        steps=2,
        repeats=2,
        warmup=1,
        arms=["none", "cfg+sag"],
        compile_unet=True,
        compile_backend="eager",
        log=lambda _msg: None,
    )
    info = data["compile"]
    assert info["backend"] == "eager" and info["graphs_after_warmup"] > before
    assert info["graphs_compiled_during_timed_runs"] == 0
    assert info["frames_converted_during_timed_runs"] == 0
    assert set(data["arms"]) == {"none", "cfg+sag"}


def test_sd3_tiny_bench_writes_the_sd_json_shape(tmp_path):
    """The sd3-tiny preset: PAG arms against diffusers' StableDiffusion3PAGPipeline, the other arms on
    attnguide alone (no diffusers time, no ratio), and SAG's cost in denoiser passes."""
    out = tmp_path / "sd3.json"
    args = ["--preset", "sd3-tiny", "--out", str(out), "--steps", "2", "--repeats", "1", "--warmup", "0"]
    assert bench.main([*args, "--arms", "none,cfg,cfg+sag,pag,cfg+pag,slg"]) == 0
    data = json.loads(out.read_text())
    assert data["preset"] == "sd3-tiny" and data["steps"] == 2 and data["resolution"] == 32
    assert data["device"].startswith("cpu") and data["compile"] is None
    assert set(data["arms"]) == {"none", "cfg", "cfg+sag", "pag", "cfg+pag", "slg"}
    assert (data["passes"]["slg"]["calls_per_step"], data["passes"]["slg"]["batches_per_step"]) == (1, 2)
    assert data["passes"]["cfg+sag"]["batches_per_step"] == 3
    keys = {"diffusers_s", "attnguide_s", "ratio", "diffusers_peak_mib", "attnguide_peak_mib"}
    for name, row in data["arms"].items():
        assert set(row) == keys and row["attnguide_s"] > 0
        if "pag" in name:
            assert row["ratio"] == pytest.approx(row["attnguide_s"] / row["diffusers_s"], rel=1e-2)
        else:
            assert row["diffusers_s"] is None and row["ratio"] is None
    a = {k: data["arms"][k]["attnguide_s"] for k in ("none", "cfg", "cfg+sag")}
    assert data["one_pass_s"] == pytest.approx(a["none"] / 2, rel=1e-3)
    per_step = (a["cfg+sag"] - a["cfg"]) / 2
    assert data["sag_overhead_in_passes"] == pytest.approx(per_step / data["one_pass_s"], rel=1e-2)
    assert data["sag_overhead_in_forward_passes"] == pytest.approx(per_step / data["forward_s"], rel=1e-2)
    assert data["sag_overhead_over_unguided"] == pytest.approx(data["sag_overhead_in_passes"], rel=1e-2)
    with pytest.raises(SystemExit, match="map-memory"):
        bench.main([*args, "--map-memory", "--overwrite"])


def test_sd3_preset_is_sd3_medium_sized():
    """The GPU preset's components, built on the meta device (no memory, no weights): 2.03e9 parameters
    in the transformer, the SD3-medium configuration, latent factor 8."""
    comps = bench.build_sd3_components("sd3", torch.float16, "meta")
    net = comps["transformer"]
    assert sum(p.numel() for p in net.parameters()) == pytest.approx(2.028e9, rel=1e-3)
    assert net.config.num_layers == 24 and net.config.joint_attention_dim == 4096
    assert next(net.parameters()).dtype == torch.float16
    assert len(comps["vae"].config.block_out_channels) == 4 and comps["vae"].config.latent_channels == 16
    assert comps["text_encoder"] is None and bench.PRESETS["sd3"] == (1024, 28)
