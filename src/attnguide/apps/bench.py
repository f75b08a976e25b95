"""``attnguide bench``: attnguide against diffusers' own pipelines, same UNet, same process.

Arms: no guidance, CFG, SAG, CFG+SAG, PAG, CFG+PAG. The reference for the first four is diffusers'
``StableDiffusionSAGPipeline`` (sag_scale 0 for the unguided arms), for the PAG arms diffusers'
``StableDiffusionPAGPipeline``; attnguide runs all six with ``attnguide.StableDiffusionSAGPipeline``.
Each arm gets warm-up runs of both implementations, then the median of ``--repeats`` timed runs each,
the two implementations' runs interleaved; on CUDA also the peak allocated memory. Weights are random:
timing does not depend on them.
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
    from ..tiny_models import tiny_sd_components

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
    return time_interleaved({"fn": fn}, device, warmup, repeats)["fn"]


def measure_map_memory(pipe, call: Callable, device: str, log: Callable[[str], None]) -> dict:
    """CFG+SAG with the map from the mid block, from the layer with the most tokens (memory-flat map),
    and from that layer with the exact N x N map forced: seconds and peak memory of each (one warm-up,
    median of two). Shows what the memory-flat map costs against the mid-block map."""
    from ..engine import attention
    from ..engine.attention import default_sag_layer, self_attention_layers

    unet = getattr(pipe.unet, "_orig_mod", pipe.unet)
    mid = default_sag_layer(unet)
    big = next(iter(self_attention_layers(unet)))
    tokens: dict[str, int] = {}

    def count(name: str):
        module = dict(unet.named_modules())[name]

        def hook(_m, args, kwargs):
            x = args[0] if args else kwargs["hidden_states"]
            tokens[name] = int(x.shape[-2] * x.shape[-1]) if x.ndim == 4 else int(x.shape[1])

        return module.register_forward_pre_hook(hook, with_kwargs=True)

    # Token counts from one call with hooks; the hooks are removed before timing (hooks turn CUDA graphs off).
    handles = [count(mid), count(big)]
    try:
        call(pipe, 7.5, 0.75, 0.0, sag_layers=big)()
    finally:
        for h in handles:
            h.remove()
    rows = {}
    for label, layer, exact in (
        ("mid_block", mid, False),
        ("largest_layer_memory_flat", big, False),
        ("largest_layer_exact", big, True),
    ):
        saved = attention.EXACT_MAP_MAX_ELEMENTS
        if exact:
            attention.EXACT_MAP_MAX_ELEMENTS = 2**62
        try:
            t, m = time_call(call(pipe, 7.5, 0.75, 0.0, sag_layers=layer), device, 1, 2)
            rows[label] = {
                "layer": layer,
                "seconds": round(t, 5),
                "peak_mib": None if m is None else round(m, 1),
            }
        except torch.OutOfMemoryError as err:
            rows[label] = {"layer": layer, "error": f"out of memory: {err}".splitlines()[0]}
        finally:
            attention.EXACT_MAP_MAX_ELEMENTS = saved
            if device.startswith("cuda"):
                torch.cuda.empty_cache()
        log(f"map from {label:28s} {rows[label]}")
    for r in rows.values():
        r["tokens"] = tokens.get(r["layer"])
    base = rows["mid_block"].get("peak_mib")
    flat = rows["largest_layer_memory_flat"].get("peak_mib")
    if base and flat:
        rows["largest_layer_memory_flat"]["peak_vs_mid_block"] = round(flat / base, 4)
    return rows


def profile_arm(arm: str, fns: dict[str, Callable[[], object]], device: str, out: Path, log) -> dict:
    """One run of ``arm`` per implementation under torch.profiler (tables of the top operators by self
    device time and by CPU time, written to ``out``) and, on CUDA, the number of host-device
    synchronisations (``torch.cuda.set_sync_debug_mode``)."""
    from torch.profiler import ProfilerActivity, profile

    out.mkdir(parents=True, exist_ok=True)
    acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.startswith("cuda") else [])
    summary = {}
    for impl, fn in fns.items():
        fn()
        _sync(device)
        with profile(activities=acts) as prof:
            fn()
            _sync(device)
        ka = prof.key_averages()
        sort = "self_cuda_time_total" if device.startswith("cuda") else "self_cpu_time_total"
        path = out / f"profile-{arm.replace('+', '_')}-{impl}.txt"
        path.write_text(
            ka.table(sort_by=sort, row_limit=25) + "\n\n" + ka.table(sort_by="cpu_time_total", row_limit=25)
        )
        row = {
            "table": str(path),
            "ops_launched": int(sum(e.count for e in ka if e.key.startswith("aten::"))),
        }
        if device.startswith("cuda"):
            with warnings.catch_warnings(record=True) as caught:
                warnings.simplefilter("always")
                torch.cuda.set_sync_debug_mode("warn")
                try:
                    fn()
                    _sync(device)
                finally:
                    torch.cuda.set_sync_debug_mode("default")
            row["host_device_syncs"] = sum("synchroniz" in str(w.message) for w in caught)
        summary[impl] = row
        log(f"profile {arm} {impl}: {row}")
    return summary


def time_interleaved(
    fns: dict[str, Callable[[], object]], device: str, warmup: int, repeats: int
) -> dict[str, tuple[float, float | None]]:
    """Like :func:`time_call` for several implementations of the same work, with their repetitions
    interleaved (the order alternates each round), so that a machine getting faster or slower during the
    measurement shifts all of them alike. Returns per name the median seconds and the peak CUDA MiB."""
    cuda = device.startswith("cuda")
    for _ in range(warmup):
        for fn in fns.values():
            fn()
    _sync(device)
    times: dict[str, list[float]] = {k: [] for k in fns}
    peaks: dict[str, float] = dict.fromkeys(fns, 0.0)
    names = list(fns)
    for r in range(repeats):
        for name in names if r % 2 == 0 else names[::-1]:
            if cuda:
                torch.cuda.reset_peak_memory_stats()
            _sync(device)
            t0 = time.perf_counter()
            fns[name]()
            _sync(device)
            times[name].append(time.perf_counter() - t0)
            if cuda:
                peaks[name] = max(peaks[name], torch.cuda.max_memory_allocated() / 2**20)
    return {k: (statistics.median(v), peaks[k] if cuda else None) for k, v in times.items()}


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
    compile_mode: str | None = None,
    compile_backend: str = "inductor",
    cuda_graphs: bool = True,
    map_memory: bool = False,
    profile_dir: str | Path | None = None,
    log: Callable[[str], None] = print,
) -> dict:
    """Time every arm for both implementations; returns the JSON-ready result."""
    from diffusers import StableDiffusionPAGPipeline as RefPAG
    from diffusers.utils import logging as dlog

    from ..pipelines import StableDiffusionSAGPipeline

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
    ours.cuda_graphs = cuda_graphs

    def call(pipe, gs: float, sag: float, pag: float, **extra_kw):
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
        return lambda: pipe(sag_scale=sag, pag_scale=pag, **kw, **extra_kw)

    def arm_row(t_ref, m_ref, t_ours, m_ours) -> dict:
        return {
            "diffusers_s": round(t_ref, 5),
            "attnguide_s": round(t_ours, 5),
            "ratio": round(t_ours / t_ref, 4),
            "diffusers_peak_mib": None if m_ref is None else round(m_ref, 1),
            "attnguide_peak_mib": None if m_ours is None else round(m_ours, 1),
        }

    def ref_for(name: str):
        gs, sag, pag = ARMS[name]
        return call(ref_pag if pag > 0 else ref_sag, gs, sag, pag)

    results: dict[str, dict] = {}
    compile_info = None
    if not compile_unet:
        for name in arms:
            timed = time_interleaved(
                {"diffusers": ref_for(name), "attnguide": call(ours, *ARMS[name])}, device, warmup, repeats
            )
            (t_ref, m_ref), (t_ours, m_ours) = timed["diffusers"], timed["attnguide"]
            results[name] = arm_row(t_ref, m_ref, t_ours, m_ours)
            log(
                f"{name:8s} diffusers {t_ref:8.4f} s   attnguide {t_ours:8.4f} s   ratio {t_ours / t_ref:.3f}"
            )
    else:
        # diffusers' pipelines eager first (they share the UNet), then attnguide with the UNet compiled in
        # place (``unet.compile()``); the compiled graphs are counted after the warm-up runs.
        ref_times = {name: time_call(ref_for(name), device, warmup, repeats) for name in arms}
        from torch._dynamo.utils import counters

        comps["unet"].compile(backend=compile_backend, **({"mode": compile_mode} if compile_mode else {}))
        t0 = time.perf_counter()
        for name in arms:
            for _ in range(max(1, warmup)):
                call(ours, *ARMS[name])()
        _sync(device)
        compile_s = time.perf_counter() - t0
        graphs_after_warmup = counters["stats"]["unique_graphs"]
        # dynamo converts a frame only when no compiled entry's guards pass: a conversion during the timed
        # runs would be a recompilation
        frames_after_warmup = counters["frames"]["total"]
        for name in arms:
            t_ours, m_ours = time_call(call(ours, *ARMS[name]), device, 0, repeats)
            (t_ref, m_ref) = ref_times[name]
            results[name] = arm_row(t_ref, m_ref, t_ours, m_ours)
            log(
                f"{name:8s} diffusers eager {t_ref:8.4f} s   attnguide compiled {t_ours:8.4f} s   "
                f"ratio {t_ours / t_ref:.3f}"
            )
        compile_info = {
            "backend": compile_backend,
            "mode": compile_mode,
            "warmup_seconds": round(compile_s, 2),
            "graphs_after_warmup": graphs_after_warmup,
            "graphs_compiled_during_timed_runs": counters["stats"]["unique_graphs"] - graphs_after_warmup,
            "frames_converted_during_timed_runs": counters["frames"]["total"] - frames_after_warmup,
        }

    extra: dict = {}
    if map_memory:
        extra["map_memory"] = measure_map_memory(ours, call, device, log)
    if profile_dir is not None:
        extra["profile"] = profile_arm(
            "cfg+sag",
            {"diffusers": ref_for("cfg+sag"), "attnguide": call(ours, *ARMS["cfg+sag"])},
            device,
            Path(profile_dir),
            log,
        )
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
        "compile": compile_info,
        "attnguide_cuda_graphs": cuda_graphs and device.startswith("cuda"),
        "arms": results,
        "sag_overhead_over_unguided": overhead,
        **extra,
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
    parser.add_argument(
        "--compile", action="store_true", help="time attnguide with its UNet compiled (unet.compile())"
    )
    parser.add_argument("--compile-mode", default=None, help="torch.compile mode, e.g. max-autotune")
    parser.add_argument(
        "--no-cuda-graphs",
        action="store_true",
        help="run attnguide's UNet passes eagerly (default on CUDA: replayed from CUDA graphs)",
    )
    parser.add_argument(
        "--map-memory",
        action="store_true",
        help="also time CFG+SAG with the map from the mid block vs the layer with the most tokens",
    )
    parser.add_argument("--profile-dir", default=None, help="profile the cfg+sag arm into this folder")
    parser.add_argument("--overwrite", action="store_true")
    args = parser.parse_args(argv)
    if args.compile and args.profile_dir:
        raise SystemExit("error: --profile-dir profiles diffusers' pipelines too; run it without --compile")
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
        compile_mode=args.compile_mode,
        cuda_graphs=not args.no_cuda_graphs,
        map_memory=args.map_memory,
        profile_dir=args.profile_dir,
    )
    from .cli import write_atomic

    write_atomic(out, lambda p: p.write_text(json.dumps(result, indent=2) + "\n"))
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
