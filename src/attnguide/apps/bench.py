"""``attnguide bench``: attnguide against diffusers' own pipelines, same UNet, same process.

Arms: no guidance, CFG, SAG, CFG+SAG, PAG, CFG+PAG, and SEG, TPG, SLG alone and with CFG. The reference
for the first four is diffusers' ``StableDiffusionSAGPipeline`` (sag_scale 0 for the unguided arms), for
the PAG arms diffusers' ``StableDiffusionPAGPipeline``; attnguide runs all with
``attnguide.StableDiffusionSAGPipeline``. SEG, TPG and SLG have no diffusers pipeline to time against
(diffusers offers SEG only as a modular-pipeline guider): their rows have attnguide's time alone.

Every arm's cost is also reported in model passes (``passes``): the denoiser calls per step and the
latent rows they process per step in units of the batch (counted by a forward pre-hook on one eager run:
CFG + SAG makes 2 calls and 3 batches of rows a step), and the timed cost t[arm] / t[none].
Each arm gets warm-up runs of both implementations, then the median of ``--repeats`` timed runs each,
the two implementations' runs interleaved; on CUDA also the peak allocated memory. Weights are random:
timing does not depend on them.

The SD3 presets (``sd3``: an SD3-medium-sized ``SD3Transformer2DModel``; ``sd3-tiny``: the tiny test
model) time PAG and CFG+PAG against diffusers' ``StableDiffusion3PAGPipeline`` (attnguide:
``attnguide.StableDiffusion3PAGPipeline``) and none, CFG, CFG+SAG on ``attnguide.StableDiffusion3SAGPipeline``
alone (diffusers has no SD3 SAG pipeline: those rows have no diffusers time and no ratio).
"""

from __future__ import annotations

import argparse
import dataclasses
import platform
import statistics
import time
import warnings
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch

from ..engine.step import place_terms
from ..engine.terms import REGISTRY
from .arms import METHOD_TERMS, Arm
from .files import write_json_atomic, write_text_atomic

#: The arms, by name: CFG at 7.5, SAG at 0.75, PAG at 3.0 (the SD1.5 scales of the two papers), every other
#: term of the registry at its library default (SEG 3.0, TPG 3.0, SLG 2.8) and in every step, so that
#: its rows cost what it costs where it is on (SLG's SD3.5 window, steps 1-20 %, would hide it in the mean).
ARMS = {
    name: Arm.from_method(
        name,
        cfg_scale=7.5,
        sag_scale=0.75,
        pag_scale=3.0,
        **{f"{cls.name}_window": (0.0, 1.0) for cls in REGISTRY if hasattr(Arm, f"{cls.name}_window")},
    )
    for name in (
        "none",
        "cfg",
        *(
            f"{cfg}{m}"
            for m, (cls, _) in METHOD_TERMS.items()
            if cls.app.bench and m == cls.name
            for cfg in (("cfg+",) if cls.app.needs_cfg else ("", "cfg+"))
        ),
    )
}
#: The denoisers' first layer on the latents, by module path (UNets, SD3): one call per model pass.
INPUT_LAYERS = ("conv_in", "pos_embed", "x_embedder")
#: The arms that diffusers has a pipeline for (the others are timed for attnguide alone).
REFERENCE_TERMS = frozenset({"cfg", "sag", "pag"})
PRESETS = {
    # preset: (default resolution in pixels, default steps)
    "tiny": (32, 10),
    "sd15": (512, 50),
    "sd3": (1024, 28),
    "sd3-tiny": (32, 10),
}
#: SD3 presets: the transformer's configuration and the number of text tokens of the prompt embeddings
#: (SD3: 77 CLIP + 256 T5 tokens; the tiny model's tests use 77 + 32).
SD3_PRESETS = {
    "sd3": (
        dict(
            sample_size=128,
            patch_size=2,
            in_channels=16,
            num_layers=24,
            attention_head_dim=64,
            num_attention_heads=24,
            joint_attention_dim=4096,
            caption_projection_dim=1536,
            pooled_projection_dim=2048,
            out_channels=16,
            pos_embed_max_size=192,
        ),
        333,
    ),
    "sd3-tiny": (
        dict(
            sample_size=16,
            patch_size=2,
            in_channels=4,
            num_layers=3,
            attention_head_dim=8,
            num_attention_heads=4,
            joint_attention_dim=32,
            caption_projection_dim=32,
            pooled_projection_dim=64,
            out_channels=4,
            pos_embed_max_size=32,
        ),
        109,
    ),
}
Run = Callable[[], object]


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


def measure_map_memory(
    pipe, call: Callable[..., Run], device: str, log: Callable[[str], None]
) -> dict[str, dict]:
    """CFG+SAG with the map from the mid block, from the layer with the most tokens (memory-flat map),
    and from that layer with the exact N x N map forced: seconds and peak memory of each (one warm-up,
    median of two). Shows what the memory-flat map costs against the mid-block map. ``call(**kwargs)``:
    a run of CFG+SAG on ``pipe`` with these further pipeline arguments."""
    from ..engine.layers import default_sag_layer, self_attention_layers

    unet = getattr(pipe.unet, "_orig_mod", pipe.unet)
    mid = default_sag_layer(unet)
    big = next(iter(self_attention_layers(unet)))
    tokens = _count_tokens(unet, [mid, big], call(sag_layers=big))
    rows = {}
    for label, layer, exact in (
        ("mid_block", mid, False),
        ("largest_layer_memory_flat", big, False),
        ("largest_layer_exact", big, True),
    ):
        saved = pipe.map_limits
        if exact:  # the pipeline reads map_limits at each call
            pipe.map_limits = dataclasses.replace(saved, exact_max_elements=2**62)
        try:
            t, m = time_call(call(sag_layers=layer), device, 1, 2)
            rows[label] = {
                "layer": layer,
                "seconds": round(t, 5),
                "peak_mib": None if m is None else round(m, 1),
            }
        except torch.OutOfMemoryError as err:
            rows[label] = {"layer": layer, "error": f"out of memory: {err}".splitlines()[0]}
        finally:
            pipe.map_limits = saved
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


def _count_tokens(unet: torch.nn.Module, layers: Sequence[str], run: Run) -> dict[str, int]:
    """The number of tokens each of ``layers`` sees in ``run()``, from forward pre-hooks that are removed
    afterwards (hooks turn CUDA graphs off, so none may stay for the timed runs)."""
    modules = dict(unet.named_modules())
    tokens: dict[str, int] = {}

    def hook_for(name: str):
        def hook(_m, args, kwargs):
            x = args[0] if args else kwargs["hidden_states"]
            tokens[name] = int(x.shape[-2] * x.shape[-1]) if x.ndim == 4 else int(x.shape[1])

        return hook

    handles = [modules[name].register_forward_pre_hook(hook_for(name), with_kwargs=True) for name in layers]
    try:
        run()
    finally:
        for h in handles:
            h.remove()
    return tokens


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
        write_text_atomic(
            path,
            ka.table(sort_by=sort, row_limit=25) + "\n\n" + ka.table(sort_by="cpu_time_total", row_limit=25),
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


@dataclasses.dataclass(frozen=True)
class Pipelines:
    """diffusers' pipelines and attnguide's, on the same components (one denoiser), and the inputs every
    timed call shares (random prompt embeddings, resolution, steps). ``ref_sag``: diffusers' pipeline for
    the arms without PAG (None: attnguide alone there). ``ours_pag``: attnguide's pipeline for the PAG
    arms (None: ``ours``)."""

    ref_sag: Any | None
    ref_pag: Any
    ours: Any
    embeds: dict[str, torch.Tensor]
    resolution: int
    steps: int
    ours_pag: Any | None = None

    @property
    def denoiser(self) -> torch.nn.Module:
        """The UNet or transformer every pipeline shares."""
        unet = getattr(self.ours, "unet", None)
        return unet if unet is not None else self.ours.transformer

    def _inputs(self) -> dict:
        return dict(
            self.embeds,
            height=self.resolution,
            width=self.resolution,
            num_inference_steps=self.steps,
            output_type="latent",
            generator=torch.Generator(device="cpu").manual_seed(0),
        )

    def reference(self, arm: Arm) -> Run | None:
        """diffusers' run of ``arm``: its PAG pipeline for the PAG arms, its SAG pipeline otherwise (None
        where there is none)."""
        kw = dict(self._inputs(), guidance_scale=arm.guidance_scale)
        if not arm.terms <= REFERENCE_TERMS:
            return None
        if arm.pag_scale > 0:
            return lambda: self.ref_pag(pag_scale=arm.pag_scale, **kw)
        if self.ref_sag is None:
            return None
        return lambda: self.ref_sag(sag_scale=arm.sag_scale, **kw)

    def pipeline_for(self, arm: Arm) -> Any:
        """attnguide's pipeline that runs ``arm``."""
        return self.ours_pag if arm.pag_scale > 0 and self.ours_pag is not None else self.ours

    def attnguide(self, arm: Arm, **extra) -> Run:
        """attnguide's run of ``arm`` (``extra``: further pipeline arguments)."""
        pipe = self.pipeline_for(arm)
        kw = dict(self._inputs(), **arm.pipeline_kwargs(), **extra)
        return lambda: pipe(**kw)

    def forward(self) -> Run:
        """One eager pass of the denoiser on a batch of ``batch_size`` latents (the size of SAG's extra
        pass, which runs on the unconditional rows only), at the first step's timestep."""
        net, embeds = self.denoiser, self.embeds["prompt_embeds"]
        factor = 2 ** (len(self.ours.vae.config.block_out_channels) - 1)
        side = self.resolution // factor
        shape = (embeds.shape[0], net.config.in_channels, side, side)
        x = torch.randn(shape, generator=torch.Generator().manual_seed(0)).to(embeds)
        t = torch.full((shape[0],), 999.0, device=embeds.device, dtype=embeds.dtype)
        if "pooled_prompt_embeds" in self.embeds:
            kw = dict(encoder_hidden_states=embeds, pooled_projections=self.embeds["pooled_prompt_embeds"])
            return torch.no_grad()(lambda: net(hidden_states=x, timestep=t, **kw, return_dict=False))
        return torch.no_grad()(lambda: net(x, t, encoder_hidden_states=embeds, return_dict=False))


def _random_embeds(shapes: dict[str, tuple[int, ...]], dtype: torch.dtype, device: str) -> dict:
    """Random tensors of ``shapes``, by name, drawn in order from one seeded CPU generator."""
    g = torch.Generator(device="cpu").manual_seed(0)
    return {k: torch.randn(*shape, generator=g).to(device=device, dtype=dtype) for k, shape in shapes.items()}


def _quiet(*pipes) -> None:
    for p in pipes:
        p.set_progress_bar_config(disable=True)


def build_pipelines(
    preset: str, *, batch_size: int, resolution: int, steps: int, dtype: torch.dtype, device: str
) -> Pipelines:
    """The pipelines of ``preset`` on its components, with random prompt embeddings for ``batch_size``:
    :func:`build_sd3_pipelines` for the SD3 presets, else diffusers' SAG and PAG pipelines and attnguide's
    on :func:`build_components`."""
    from diffusers.utils import logging as dlog

    dlog.set_verbosity_error()
    if preset in SD3_PRESETS:
        return build_sd3_pipelines(
            preset, batch_size=batch_size, resolution=resolution, steps=steps, dtype=dtype, device=device
        )
    from diffusers import StableDiffusionPAGPipeline as RefPAG

    from ..pipelines import StableDiffusionSAGPipeline

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        from diffusers import StableDiffusionSAGPipeline as RefSAG

    comps, width = build_components(preset, dtype, device)
    shape = (batch_size, 77, width)
    embeds = _random_embeds({"prompt_embeds": shape, "negative_prompt_embeds": shape}, dtype, device)
    ref_sag = RefSAG(**comps).to(device)
    ref_pag = RefPAG(**comps, pag_applied_layers=["mid"]).to(device)
    ours = StableDiffusionSAGPipeline(**comps).to(device)
    _quiet(ref_sag, ref_pag, ours)
    return Pipelines(ref_sag, ref_pag, ours, embeds, resolution, steps)


def build_sd3_components(preset: str, dtype: torch.dtype, device: str) -> dict:
    """SD3 pipeline components with random weights: the transformer of ``SD3_PRESETS[preset]`` (built
    on ``device``), a tiny VAE with the SD3 latent factor of the preset (4 levels: 8; tiny: 2; never run,
    the benchmark returns latents), FlowMatchEulerDiscreteScheduler (shift 3) and no text encoders (the
    benchmark passes prompt embeddings)."""
    from diffusers import AutoencoderKL, FlowMatchEulerDiscreteScheduler, SD3Transformer2DModel

    config, _tokens = SD3_PRESETS[preset]
    tiny = preset == "sd3-tiny"
    with torch.random.fork_rng(devices=[]), torch.device(device):
        torch.manual_seed(0)
        transformer = SD3Transformer2DModel(**config)
        torch.manual_seed(0)
        vae = AutoencoderKL(
            block_out_channels=[32, 64] if tiny else [32] * 4,
            down_block_types=["DownEncoderBlock2D"] * (2 if tiny else 4),
            up_block_types=["UpDecoderBlock2D"] * (2 if tiny else 4),
            latent_channels=config["in_channels"],
            norm_num_groups=32,
            sample_size=config["sample_size"] * (2 if tiny else 8),
            shift_factor=0.0 if tiny else 0.0609,
            scaling_factor=0.18215 if tiny else 1.5305,
        )
    none = dict.fromkeys(["text_encoder", "text_encoder_2", "text_encoder_3"])
    none.update(dict.fromkeys(["tokenizer", "tokenizer_2", "tokenizer_3"]))
    return {
        "transformer": transformer.to(dtype=dtype).eval(),
        "vae": vae.to(dtype=dtype).eval(),
        "scheduler": FlowMatchEulerDiscreteScheduler(shift=3.0),
        **none,
    }


def build_sd3_pipelines(
    preset: str, *, batch_size: int, resolution: int, steps: int, dtype: torch.dtype, device: str
) -> Pipelines:
    """diffusers' ``StableDiffusion3PAGPipeline``, attnguide's drop-in ``StableDiffusion3PAGPipeline`` and
    ``StableDiffusion3SAGPipeline`` on :func:`build_sd3_components` (one transformer), with random prompt
    embeddings (batch_size, tokens, joint_attention_dim) and pooled ones (batch_size, pooled dim)."""
    from diffusers import StableDiffusion3PAGPipeline as RefPAG

    from ..pipelines import StableDiffusion3PAGPipeline, StableDiffusion3SAGPipeline

    comps = build_sd3_components(preset, dtype, device)
    config, tokens = SD3_PRESETS[preset]
    seq = (batch_size, tokens, config["joint_attention_dim"])
    pooled = (batch_size, config["pooled_projection_dim"])
    shapes = {
        "prompt_embeds": seq,
        "negative_prompt_embeds": seq,
        "pooled_prompt_embeds": pooled,
        "negative_pooled_prompt_embeds": pooled,
    }
    embeds = _random_embeds(shapes, dtype, device)
    ref_pag = RefPAG(**comps).to(device)
    ours_pag = StableDiffusion3PAGPipeline(**comps).to(device)
    ours = StableDiffusion3SAGPipeline(**comps).to(device)
    _quiet(ref_pag, ours_pag, ours)
    return Pipelines(None, ref_pag, ours, embeds, resolution, steps, ours_pag=ours_pag)


def count_passes(pipes: Pipelines, arm: Arm) -> dict[str, float]:
    """The denoiser calls per step of one eager run of ``arm`` and the latent rows they process per step
    in units of the batch (``batches_per_step``: 1 unguided, 2 CFG, 3 CFG + SAG), counted by a forward
    pre-hook on the denoiser's input layer (:data:`INPUT_LAYERS`: every pass, the pipeline's and the
    guidance's, goes through it) with CUDA graphs off for the run (a replayed graph calls no forward)."""
    pipe, modules = pipes.pipeline_for(arm), dict(pipes.denoiser.named_modules())
    layer = next((modules[n] for n in INPUT_LAYERS if n in modules), None)
    if layer is None:
        raise ValueError(f"the denoiser has none of the input layers {INPUT_LAYERS} to count passes at")
    batch = pipes.embeds["prompt_embeds"].shape[0]
    calls, rows = [0], [0]

    def hook(_module, args):
        calls[0] += 1
        rows[0] += args[0].shape[0]

    graphs = getattr(pipe, "cuda_graphs", False)
    pipe.cuda_graphs = False
    handle = layer.register_forward_pre_hook(hook)
    try:
        pipes.attnguide(arm)()
    finally:
        handle.remove()
        pipe.cuda_graphs = graphs
    return {
        "calls_per_step": round(calls[0] / pipes.steps, 4),
        "batches_per_step": round(rows[0] / (pipes.steps * batch), 4),
    }


def term_costs(results: dict[str, dict], pipes: Pipelines, log: Callable[[str], None]) -> dict[str, dict]:
    """Each timed arm's cost in model passes: :func:`count_passes` and, where the unguided arm was timed,
    ``time_vs_none`` = t[arm] / t[none] (attnguide's times; 1 + the extra passes' share of the time)."""
    out = {}
    base = results.get("none", {}).get("attnguide_s")
    for name, row in results.items():
        counted = count_passes(pipes, ARMS[name])
        counted["time_vs_none"] = None if not base else round(row["attnguide_s"] / base, 4)
        out[name] = counted
        timed = "" if counted["time_vs_none"] is None else f", time x{counted['time_vs_none']:.3f} of none"
        log(
            f"{name:8s} {counted['calls_per_step']:.2f} calls/step, "
            f"{counted['batches_per_step']:.2f} batches of rows/step{timed}"
        )
    return out


def _arm_row(ref: tuple[float, float | None] | None, ours: tuple[float, float | None]) -> dict:
    """A row of the result; without a reference (``ref`` None) the diffusers fields and ratio are None."""
    t_ref, m_ref = ref if ref is not None else (None, None)
    t_ours, m_ours = ours
    return {
        "diffusers_s": None if t_ref is None else round(t_ref, 5),
        "attnguide_s": round(t_ours, 5),
        "ratio": None if t_ref is None else round(t_ours / t_ref, 4),
        "diffusers_peak_mib": None if m_ref is None else round(m_ref, 1),
        "attnguide_peak_mib": None if m_ours is None else round(m_ours, 1),
    }


def _log_row(
    log: Callable[[str], None], name: str, row: dict, ref: str = "diffusers", ours: str = "attnguide"
):
    if row["ratio"] is None:
        log(f"{name:8s} {ours} {row['attnguide_s']:8.4f} s   (no diffusers reference)")
    else:
        log(
            f"{name:8s} {ref} {row['diffusers_s']:8.4f} s   {ours} {row['attnguide_s']:8.4f} s   "
            f"ratio {row['ratio']:.3f}"
        )


def time_eager(
    pipes: Pipelines, arms: Sequence[str], device: str, warmup: int, repeats: int, log: Callable[[str], None]
) -> dict[str, dict]:
    """Each arm with both implementations eager, their runs interleaved (attnguide alone where diffusers
    has no pipeline for the arm): the rows of the result."""
    results = {}
    for name in arms:
        arm = ARMS[name]
        fns = {"diffusers": pipes.reference(arm), "attnguide": pipes.attnguide(arm)}
        timed = time_interleaved({k: f for k, f in fns.items() if f is not None}, device, warmup, repeats)
        results[name] = _arm_row(timed.get("diffusers"), timed["attnguide"])
        _log_row(log, name, results[name])
    return results


def time_compiled(
    pipes: Pipelines,
    arms: Sequence[str],
    device: str,
    warmup: int,
    repeats: int,
    log: Callable[[str], None],
    *,
    backend: str = "inductor",
    mode: str | None = None,
) -> tuple[dict[str, dict], dict]:
    """diffusers' pipelines eager first (they share the denoiser), then attnguide with the denoiser
    compiled in place (``unet.compile()`` / ``transformer.compile()``); the compiled graphs are counted
    after the warm-up runs. Returns the rows and the compilation summary."""
    from torch._dynamo.utils import counters

    refs = {name: pipes.reference(ARMS[name]) for name in arms}
    ref_times = {name: time_call(fn, device, warmup, repeats) for name, fn in refs.items() if fn is not None}
    pipes.denoiser.compile(backend=backend, **({"mode": mode} if mode else {}))
    t0 = time.perf_counter()
    for name in arms:
        for _ in range(max(1, warmup)):
            pipes.attnguide(ARMS[name])()
    _sync(device)
    compile_s = time.perf_counter() - t0
    graphs_after_warmup = counters["stats"]["unique_graphs"]
    # dynamo converts a frame only when no compiled entry's guards pass: a conversion during the timed
    # runs would be a recompilation
    frames_after_warmup = counters["frames"]["total"]
    results = {}
    for name in arms:
        ours = time_call(pipes.attnguide(ARMS[name]), device, 0, repeats)
        results[name] = _arm_row(ref_times.get(name), ours)
        _log_row(log, name, results[name], "diffusers eager", "attnguide compiled")
    info = {
        "backend": backend,
        "mode": mode,
        "warmup_seconds": round(compile_s, 2),
        "graphs_after_warmup": graphs_after_warmup,
        "graphs_compiled_during_timed_runs": counters["stats"]["unique_graphs"] - graphs_after_warmup,
        "frames_converted_during_timed_runs": counters["frames"]["total"] - frames_after_warmup,
    }
    return results, info


def sag_cost(
    results: dict[str, dict], pipes: Pipelines, device: str, repeats: int, log: Callable[[str], None]
) -> dict:
    """What SAG adds to CFG, from attnguide's times (None where an arm was not timed), with
    d = (t[CFG+SAG] - t[CFG]) / steps, the extra time per step:

    - ``sag_overhead_over_unguided`` = d * steps / t[none];
    - ``sag_overhead_in_passes`` = d / ``one_pass_s``, extra denoiser passes per step, one pass =
      ``one_pass_s`` = t[none] / steps (a pass on the batch, the size of SAG's extra pass, in the same
      execution mode, CUDA graphs included; numerically the ratio above);
    - ``sag_overhead_in_forward_passes`` = d / ``forward_s``, the same in units of one eager denoiser
      call on the batch timed directly (median of ``repeats``), the cross-check.

    SAG's extra pass alone makes these 1.0."""
    keys = ["sag_overhead_over_unguided", "sag_overhead_in_passes", "sag_overhead_in_forward_passes"]
    out: dict = dict.fromkeys([*keys, "one_pass_s"])
    t_fwd, _ = time_call(pipes.forward(), device, 1, repeats)
    out["forward_s"] = round(t_fwd, 6)
    if {"none", "cfg", "cfg+sag"} <= set(results):
        r = {k: results[k]["attnguide_s"] for k in ("none", "cfg", "cfg+sag")}
        one_pass, d = r["none"] / pipes.steps, (r["cfg+sag"] - r["cfg"]) / pipes.steps
        out["sag_overhead_over_unguided"] = round(d * pipes.steps / r["none"], 4)
        out["sag_overhead_in_passes"] = round(d / one_pass, 4)
        out["sag_overhead_in_forward_passes"] = round(d / t_fwd, 4)
        out["one_pass_s"] = round(one_pass, 6)
        log(
            f"SAG over CFG per step: {out['sag_overhead_in_passes']:.3f} passes of {one_pass:.5f} s "
            f"(t[none] / steps), {out['sag_overhead_in_forward_passes']:.3f} eager forwards of {t_fwd:.5f} s"
        )
    return out


def _device_name(device: str) -> str:
    if device.startswith("cuda"):
        return torch.cuda.get_device_name()
    return f"cpu ({platform.processor() or platform.machine()}, {torch.get_num_threads()} threads)"


def runnable_arms(
    denoiser: torch.nn.Module, arms: Sequence[str], log: Callable[[str], None]
) -> tuple[list[str], dict[str, str]]:
    """The arms whose terms can act on ``denoiser`` and, for the others, why not (the engine's refusal,
    before any model call: e.g. a term that needs cross-attention on a joint-attention transformer)."""
    kept, skipped = [], {}
    for name in arms:
        try:
            place_terms(denoiser, ARMS[name].engine_terms())
        except ValueError as err:
            skipped[name] = str(err).splitlines()[0]
            log(f"{name:8s} skipped: {skipped[name]}")
            continue
        kept.append(name)
    return kept, skipped


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
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    res = resolution or PRESETS[preset][0]
    steps = steps or PRESETS[preset][1]
    pipes = build_pipelines(
        preset, batch_size=batch_size, resolution=res, steps=steps, dtype=getattr(torch, dtype), device=device
    )
    for pipe in (pipes.ours, pipes.ours_pag):
        if pipe is not None:
            pipe.cuda_graphs = cuda_graphs
    arms, skipped = runnable_arms(pipes.denoiser, arms, log)
    compile_info = None
    if compile_unet:
        results, compile_info = time_compiled(
            pipes, arms, device, warmup, repeats, log, backend=compile_backend, mode=compile_mode
        )
    else:
        results = time_eager(pipes, arms, device, warmup, repeats, log)

    cfg_sag = ARMS["cfg+sag"]
    extra: dict = {}
    if map_memory:
        extra["map_memory"] = measure_map_memory(
            pipes.ours, lambda **kw: pipes.attnguide(cfg_sag, **kw), device, log
        )
    if profile_dir is not None:
        fns = {"diffusers": pipes.reference(cfg_sag), "attnguide": pipes.attnguide(cfg_sag)}
        fns = {k: f for k, f in fns.items() if f is not None}
        extra["profile"] = profile_arm("cfg+sag", fns, device, Path(profile_dir), log)
    return {
        "preset": preset,
        "device": _device_name(device),
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
        "skipped": skipped,
        "passes": term_costs(results, pipes, log),
        **sag_cost(results, pipes, device, repeats, log),
        **extra,
    }


def main(argv: Sequence[str] | None = None) -> int:
    """``attnguide bench`` with ``argv``: run the benchmark and write its JSON; returns the exit status."""
    parser = argparse.ArgumentParser(prog="attnguide bench", description=__doc__.splitlines()[0])
    parser.add_argument("--preset", choices=sorted(PRESETS), default="tiny")
    parser.add_argument("--out", required=True, help="JSON file to write")
    parser.add_argument("--batch-size", type=int, default=1)
    parser.add_argument(
        "--resolution",
        type=int,
        default=None,
        help="pixels (default: 32 tiny and sd3-tiny, 512 sd15, 1024 sd3)",
    )
    parser.add_argument(
        "--steps", type=int, default=None, help="default: 10 tiny and sd3-tiny, 50 sd15, 28 sd3"
    )
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
    if args.map_memory and args.preset in SD3_PRESETS:
        raise SystemExit("error: --map-memory needs a UNet preset (tiny, sd15)")
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
    write_json_atomic(out, result)
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
