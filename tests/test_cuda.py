"""CUDA-only checks: graph replay gives the eager results, the memory-flat map on the GPU.

Skipped without a CUDA device (CI has none); run them on a GPU machine with ``pytest tests/test_cuda.py``.
"""

from __future__ import annotations

import pytest
import torch
from conftest import quiet

from attnguide import StableDiffusionPAGPipeline, StableDiffusionSAGPipeline
from attnguide.engine.attention import MapLimits
from attnguide.tiny_models import tiny_sd_components

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")

KW = dict(prompt=["a cat", "a dog"], height=32, width=40, num_inference_steps=5, output_type="latent")


def _pipe(cls=StableDiffusionSAGPipeline, scheduler="ddim"):
    comps = tiny_sd_components(0, scheduler=scheduler)
    return quiet(cls(**comps)).to("cuda")


def _run(pipe, graphs: bool, **kw):
    pipe.cuda_graphs = graphs
    return pipe(generator=torch.Generator().manual_seed(0), **{**KW, **kw}).images


@pytest.mark.parametrize(
    "kw",
    [
        dict(guidance_scale=7.5, sag_scale=0.75),
        dict(guidance_scale=1.0, sag_scale=0.75),
        dict(guidance_scale=7.5, sag_scale=0.75, pag_scale=2.0),
        dict(guidance_scale=5.0, sag_scale=0.5, sag_window=(0.2, 0.8)),
        dict(guidance_scale=7.5, sag_scale=0.0),
    ],
)
@pytest.mark.parametrize("scheduler", ["ddim", "euler", "dpm"])
def test_graph_replay_equals_eager(kw, scheduler):
    pipe = _pipe(scheduler=scheduler)
    eager = _run(pipe, False, **kw)
    graphed = _run(pipe, True, **kw)
    assert pipe.last_guider.graphs is not None
    torch.testing.assert_close(graphed, eager, rtol=0, atol=1e-5)
    # a second call captures afresh and gives the same again
    torch.testing.assert_close(_run(pipe, True, **kw), graphed, rtol=0, atol=0)


def test_graphs_pag_pipeline_and_processors_restored():
    pipe = _pipe(StableDiffusionPAGPipeline)
    before = {k: type(v) for k, v in pipe.unet.attn_processors.items()}
    eager = _run(pipe, False, guidance_scale=7.5, pag_scale=3.0)
    graphed = _run(pipe, True, guidance_scale=7.5, pag_scale=3.0)
    torch.testing.assert_close(graphed, eager, rtol=0, atol=1e-5)
    assert {k: type(v) for k, v in pipe.unet.attn_processors.items()} == before


def test_graphs_follow_callback_that_changes_embeddings():
    pipe = _pipe()

    def swap(p, i, t, kw):
        if i == 2:
            return {"prompt_embeds": kw["prompt_embeds"] * 0.5}
        return {}

    kw = dict(
        guidance_scale=7.5,
        sag_scale=0.75,
        callback_on_step_end=swap,
        callback_on_step_end_tensor_inputs=["prompt_embeds"],
    )
    torch.testing.assert_close(_run(pipe, True, **kw), _run(pipe, False, **kw), rtol=0, atol=1e-5)


def test_hooks_disable_graphs():
    pipe = _pipe()
    handle = pipe.unet.mid_block.register_forward_hook(lambda *a: None)
    try:
        _run(pipe, True, guidance_scale=7.5, sag_scale=0.75)
        assert pipe.last_guider.graphs is None
    finally:
        handle.remove()


def test_memory_flat_map_matches_exact_on_cuda():
    """The chunked map of a real layer on the GPU equals the explicit-probability map (the final images
    are not compared: a map value within rounding of psi may flip a mask pixel either way)."""
    from diffusers.models.attention_processor import AttnProcessor2_0

    from attnguide.engine.attention import GuidanceState, MapLimits, guided_attention

    pipe = _pipe()
    attn = pipe.unet.down_blocks[1].attentions[0].transformer_blocks[0].attn1
    x = torch.randn(
        4, 80, attn.to_q.in_features, device="cuda", generator=torch.Generator("cuda").manual_seed(0)
    )
    maps = {}
    for exact in (True, False):
        state = GuidanceState(capture=True)
        limits = MapLimits(exact_max_elements=2**62 if exact else 0)
        proc = guided_attention(AttnProcessor2_0(), "layer", state, capture=True, limits=limits)
        out = proc(attn, x)
        maps[exact] = (state.maps["layer"][0], out)
    torch.testing.assert_close(maps[False][0], maps[True][0], rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(maps[False][1], maps[True][1], rtol=1e-4, atol=1e-4)


def test_memory_flat_map_under_graphs():
    pipe = _pipe()
    layer = "down_blocks.1.attentions.0.transformer_blocks.0.attn1"
    pipe.map_limits = MapLimits(exact_max_elements=0, chunk_elements=64)
    flat = _run(pipe, False, guidance_scale=7.5, sag_scale=0.75, sag_layers=layer)
    flat_graphed = _run(pipe, True, guidance_scale=7.5, sag_scale=0.75, sag_layers=layer)
    torch.testing.assert_close(flat_graphed, flat, rtol=0, atol=1e-5)


def test_sdxl_graph_replay_equals_eager():
    from test_sdxl import tiny_sdxl_components

    from attnguide import StableDiffusionXLSAGPipeline

    pipe = quiet(StableDiffusionXLSAGPipeline(**tiny_sdxl_components("ddim"))).to("cuda")
    kw = dict(prompt="a cat", height=32, width=32, num_inference_steps=4, output_type="latent")
    kw.update(guidance_scale=5.0, sag_scale=0.75)
    outs = []
    for graphs in (False, True):
        pipe.cuda_graphs = graphs
        outs.append(pipe(generator=torch.Generator().manual_seed(0), **kw).images)
    assert pipe.last_guider.graphs is not None and pipe.last_guider.graphs.enabled
    torch.testing.assert_close(outs[1], outs[0], rtol=0, atol=1e-5)
