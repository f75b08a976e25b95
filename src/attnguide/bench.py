"""``attnguide bench``: attnguide against diffusers' own pipelines, same UNet, same process.

Arms: no guidance, CFG, SAG, CFG+SAG, PAG, CFG+PAG. The reference for the first four is diffusers'
``StableDiffusionSAGPipeline`` (sag_scale 0 for the unguided arms), for the PAG arms diffusers'
``StableDiffusionPAGPipeline``; attnguide runs all six with ``attnguide.StableDiffusionSAGPipeline``.
Each (implementation, arm) gets warm-up runs, then the median of ``--repeats`` timed runs; on CUDA also
the peak allocated memory. Weights are random: timing does not depend on them.
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import time
import warnings
from collections.abc import Callable, Sequence
from pathlib import Path

import torch

ARMS = {
    #  name       guidance_scale, sag_scale, pag_scale
    "none": (1.0, 0.0, 0.0),
    "cfg": (7.5, 0.0, 0.0),
    "sag": (1.0, 0.75, 0.0),
    "cfg+sag": (7.5, 0.75, 0.0),
    "pag": (1.0, 0.0, 3.0),
    "cfg+pag": (7.5, 0.0, 3.0),
}
PRESETS = {
    # preset: (default resolution in pixels, default steps)
    "tiny": (32, 10),
    "sd15": (512, 50),
}


def build_components(preset: str, dtype: torch.dtype, device: str) -> tuple[dict, int]:
    """Pipeline components with random weights: the tiny test model or an SD1.5-sized UNet.

    Returns the components and the text-embedding width. The text encoder is never run (the benchmark
    passes prompt embeddings), so the SD1.5 preset keeps the tiny one.
    """
    from .tiny import tiny_sd_components

    comps = tiny_sd_components(0)
    width = 32
    if preset == "sd15":
        from diffusers import AutoencoderKL, UNet2DConditionModel

        torch.manual_seed(0)
        comps["unet"] = UNet2DConditionModel(sample_size=64, cross_attention_dim=768, attention_head_dim=8)
        torch.manual_seed(0)
        comps["vae"] = AutoencoderKL(
            block_out_channels=[32, 32, 32, 32],
            down_block_types=["DownEncoderBlock2D"] * 4,
            up_block_types=["UpDecoderBlock2D"] * 4,
            latent_channels=4,
            norm_num_groups=32,
        )
        width = 768
    elif preset != "tiny":
        raise ValueError(f"preset must be one of {sorted(PRESETS)}, got {preset!r}")
    for k in ("unet", "vae", "text_encoder"):
        comps[k] = comps[k].to(device=device, dtype=dtype).eval()
    return comps, width


def _sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def time_call(fn: Callable[[], object], device: str, warmup: int, repeats: int) -> tuple[float, float | None]:
    """Median seconds of ``repeats`` calls after ``warmup`` calls, and the peak CUDA memory in MiB."""
    for _ in range(warmup):
        fn()
    _sync(device)
    if device.startswith("cuda"):
        torch.cuda.reset_peak_memory_stats()
    times = []
    for _ in range(repeats):
        _sync(device)
        t0 = time.perf_counter()
        fn()
        _sync(device)
        times.append(time.perf_counter() - t0)
    peak = torch.cuda.max_memory_allocated() / 2**20 if device.startswith("cuda") else None
    return statistics.median(times), peak


def run_benchmark(
    preset: str = "tiny",
    *,
    batch_size: int = 1,
    resolution: int | None = None,
    steps: int | None = None,
    dtype: str = "float32",
    device: str | None = None,
    repeats: int = 3,
    warmup: int = 1,
    arms: Sequence[str] = tuple(ARMS),
    compile_unet: bool = False,
    log: Callable[[str], None] = print,
) -> dict:
    """Time every arm for both implementations; returns the JSON-ready result."""
    from diffusers import StableDiffusionPAGPipeline as RefPAG
    from diffusers.utils import logging as dlog

    from .pipelines import StableDiffusionSAGPipeline

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        from diffusers import StableDiffusionSAGPipeline as RefSAG

    dlog.set_verbosity_error()
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    torch_dtype = getattr(torch, dtype)
    res = resolution or PRESETS[preset][0]
    steps = steps or PRESETS[preset][1]
    comps, width = build_components(preset, torch_dtype, device)
    g = torch.Generator(device="cpu").manual_seed(0)
    pe = torch.randn(batch_size, 77, width, generator=g).to(device=device, dtype=torch_dtype)
    ne = torch.randn(batch_size, 77, width, generator=g).to(device=device, dtype=torch_dtype)
    ref_sag = RefSAG(**comps).to(device)
    ref_pag = RefPAG(**comps, pag_applied_layers=["mid"]).to(device)
    ours = StableDiffusionSAGPipeline(**comps).to(device)
    for p in (ref_sag, ref_pag, ours):
        p.set_progress_bar_config(disable=True)
    ours_unet = ours.unet
    if compile_unet:
        ours.unet = torch.compile(ours_unet)

    def call(pipe, gs: float, sag: float, pag: float):
        kw = dict(
            prompt_embeds=pe,
            negative_prompt_embeds=ne,
            height=res,
            width=res,
            num_inference_steps=steps,
            guidance_scale=gs,
            output_type="latent",
            generator=torch.Generator(device="cpu").manual_seed(0),
        )
        if pipe is ref_pag:
            return lambda: pipe(pag_scale=pag, **kw)
        if pipe is ref_sag:
            return lambda: pipe(sag_scale=sag, **kw)
        return lambda: pipe(sag_scale=sag, pag_scale=pag, **kw)

    results = {}
    for name in arms:
        gs, sag, pag = ARMS[name]
        ref = ref_pag if pag > 0 else ref_sag
        t_ref, m_ref = time_call(call(ref, gs, sag, pag), device, warmup, repeats)
        t_ours, m_ours = time_call(call(ours, gs, sag, pag), device, warmup, repeats)
        results[name] = {
            "diffusers_s": round(t_ref, 5),
            "attnguide_s": round(t_ours, 5),
            "ratio": round(t_ours / t_ref, 4),
            "diffusers_peak_mib": None if m_ref is None else round(m_ref, 1),
            "attnguide_peak_mib": None if m_ours is None else round(m_ours, 1),
        }
        log(f"{name:8s} diffusers {t_ref:8.4f} s   attnguide {t_ours:8.4f} s   ratio {t_ours / t_ref:.3f}")
    overhead = None
    if {"none", "cfg", "cfg+sag"} <= set(results):
        r = {k: results[k]["attnguide_s"] for k in ("none", "cfg", "cfg+sag")}
        overhead = round((r["cfg+sag"] - r["cfg"]) / r["none"], 4)
    return {
        "preset": preset,
        "device": torch.cuda.get_device_name()
        if device.startswith("cuda")
        else f"cpu ({platform.processor() or platform.machine()}, {torch.get_num_threads()} threads)",
        "torch": torch.__version__,
        "diffusers": __import__("diffusers").__version__,
        "batch_size": batch_size,
        "resolution": res,
        "steps": steps,
        "dtype": dtype,
        "repeats": repeats,
        "warmup": warmup,
        "compile": compile_unet,
        "arms": results,
        "sag_overhead_over_unguided": overhead,
    }


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="attnguide bench", description=__doc__.splitlines()[0])
    parser.add_argument("--preset", choices=sorted(PRESETS), default="tiny")
    parser.add_argument("--out", required=True, help="JSON file to write")
    parser.add_argument("--batch-size", type=int, default=1)
    parser.add_argument("--resolution", type=int, default=None, help="pixels (default: 32 tiny, 512 sd15)")
    parser.add_argument("--steps", type=int, default=None, help="default: 10 tiny, 50 sd15")
    parser.add_argument("--dtype", choices=["float32", "float16", "bfloat16"], default=None)
    parser.add_argument("--device", default=None)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--arms", default=",".join(ARMS), help=f"comma list from {', '.join(ARMS)}")
    parser.add_argument("--compile", action="store_true", help="torch.compile attnguide's UNet")
    parser.add_argument("--overwrite", action="store_true")
    args = parser.parse_args(argv)
    out = Path(args.out)
    if out.exists() and not args.overwrite:
        raise SystemExit(f"error: {out} exists (pass --overwrite to replace it)")
    arms = [a.strip() for a in args.arms.split(",") if a.strip()]
    unknown = [a for a in arms if a not in ARMS]
    if unknown:
        raise SystemExit(f"error: --arms: unknown {unknown}; choose from {', '.join(ARMS)}")
    if args.batch_size < 1 or args.repeats < 1 or args.warmup < 0:
        raise SystemExit("error: --batch-size and --repeats must be >= 1, --warmup >= 0")
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    dtype = args.dtype or ("float16" if device.startswith("cuda") else "float32")
    result = run_benchmark(
        args.preset,
        batch_size=args.batch_size,
        resolution=args.resolution,
        steps=args.steps,
        dtype=dtype,
        device=device,
        repeats=args.repeats,
        warmup=args.warmup,
        arms=arms,
        compile_unet=args.compile,
    )
    from .cli import write_atomic

    write_atomic(out, lambda p: p.write_text(json.dumps(result, indent=2) + "\n"))
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
