"""Fast unit tests of the building blocks: degradations, denoiser conversions, guidance formulas and the
attention processors / layer selection. No pipeline is run here; every test takes milliseconds."""

from __future__ import annotations

import math

import pytest
import torch
from diffusers import DDIMScheduler, DPMSolverMultistepScheduler, EulerDiscreteScheduler
from diffusers.models.attention_processor import Attention, AttnProcessor2_0
from diffusers.pipelines.deprecated.stable_diffusion_sag.pipeline_stable_diffusion_sag import (
    gaussian_blur_2d as ref_gaussian_blur_2d,
)
from diffusers.pipelines.stable_diffusion.pipeline_stable_diffusion import rescale_noise_cfg
from torch import nn

from attnguide.engine.attention import (
    GuidanceState,
    GuidedAttention,
    MapLimits,
    ProcessorSwap,
    aggregated_map_chunked,
    guided_attention,
)
from attnguide.engine.degrade import (
    attention_mask,
    combine_attention_maps,
    gaussian_blur_2d,
    highfreq_mask,
    infer_grid,
    random_mask,
    square_mask,
)
from attnguide.engine.guidance import (
    PAG,
    SAG,
    check_scale,
    combine,
    in_window,
    rescale_cfg,
    sag_degraded_input,
)
from attnguide.engine.layers import default_pag_layers, default_sag_layer, resolve_layers
from attnguide.engine.layout import LatentLayout, as_images, from_images
from attnguide.engine.parameterization import (
    PREDICTION_TYPES,
    NoiseLevel,
    alpha_bar_at,
    predict_eps,
    predict_x0,
    renoise,
    uses_sigma_schedule,
)
from attnguide.engine.terms import StepContext, StepOutputs


def _vp(abar) -> NoiseLevel:
    return NoiseLevel.variance_preserving(torch.as_tensor(abar))


def _capture(name: str, state: GuidanceState, limits: MapLimits | None = None) -> GuidedAttention:
    limits = limits or MapLimits()
    return guided_attention(AttnProcessor2_0(), name, state, capture=True, limits=limits)


def _identity(inner, state: GuidanceState, name: str = "layer") -> GuidedAttention:
    return guided_attention(inner, name, state, terms={"pag": PAG()})


def _pag_rows(n: int, total: int) -> GuidanceState:
    """A state whose last ``n`` of ``total`` rows are PAG's branch."""
    return GuidanceState(groups={"pag": (total - n, total)} if n else {}, batch_rows=total)


def _gen(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _randn(*shape: int, seed: int = 0, dtype=torch.float32) -> torch.Tensor:
    return torch.randn(*shape, generator=_gen(seed), dtype=dtype)


# =========================================================================== degrade: blur


@pytest.mark.parametrize(
    ("shape", "kernel_size", "sigma", "dtype"),
    [
        ((1, 3, 16, 16), 9, 1.0, torch.float32),
        ((2, 4, 12, 20), 5, 0.7, torch.float32),
        ((1, 1, 33, 17), 3, 2.0, torch.float32),
        ((2, 4, 8, 8), 7, 3.0, torch.float64),
        # Smallest image that still takes the reflect path for kernel 9 (pad 4 < side 5).
        ((1, 2, 5, 5), 9, 1.0, torch.float32),
    ],
)
def test_gaussian_blur_equals_diffusers_reference(shape, kernel_size, sigma, dtype):
    img = _randn(*shape, dtype=dtype)
    out = gaussian_blur_2d(img, kernel_size, sigma)
    ref = ref_gaussian_blur_2d(img, kernel_size, sigma)
    assert out.shape == img.shape
    assert out.dtype == dtype
    assert torch.equal(out, ref)


def test_gaussian_blur_preserves_constant_image():
    img = torch.full((2, 3, 16, 12), 0.37)
    out = gaussian_blur_2d(img, 9, 1.5)
    torch.testing.assert_close(out, img, atol=1e-6, rtol=0)
    assert abs(out.mean().item() - 0.37) < 1e-6


def test_gaussian_blur_actually_smooths():
    img = _randn(1, 1, 32, 32)
    out = gaussian_blur_2d(img, 9, 1.0)
    # A blur removes variance from white noise and keeps the sum of the kernel = 1 (mean roughly kept).
    assert out.std() < 0.6 * img.std()


def test_gaussian_blur_replicate_fallback_for_tiny_image():
    img = _randn(1, 2, 3, 3)
    out = gaussian_blur_2d(img, 9, 1.0)
    assert out.shape == img.shape
    assert torch.isfinite(out).all()
    # Values stay within the range of the input (a convex combination of edge-replicated pixels).
    assert out.min() >= img.min() - 1e-6
    assert out.max() <= img.max() + 1e-6
    const = torch.full((1, 2, 3, 3), -1.25)
    torch.testing.assert_close(gaussian_blur_2d(const, 9, 1.0), const, atol=1e-6, rtol=0)


# =========================================================================== degrade: grids and masks


@pytest.mark.parametrize(
    ("num_tokens", "height", "width", "expected"),
    [
        (16 * 24, 16, 24, (16, 24)),
        (8 * 12, 16, 24, (8, 12)),
        (4 * 6, 16, 24, (4, 6)),
        (15 * 9, 15, 9, (15, 9)),
        (math.ceil(15 / 2) * math.ceil(9 / 2), 15, 9, (8, 5)),
        (math.ceil(15 / 4) * math.ceil(9 / 4), 15, 9, (4, 3)),
        (256, 32, 32, (16, 16)),  # DiT, patch size 2
        (64, 32, 32, (8, 8)),  # patch size 4
    ],
)
def test_infer_grid(num_tokens, height, width, expected):
    assert infer_grid(num_tokens, height, width) == expected


def test_infer_grid_impossible_count_raises():
    with pytest.raises(ValueError, match="7 attention tokens"):
        infer_grid(7, 16, 16)


def test_attention_mask_thresholds_then_upsamples_nearest():
    attn_map = torch.tensor(
        [
            [0.5, 1.0, 1.5, 2.0, 0.0, 1.01],  # 1.0 exactly is not above the threshold
            [3.0, 0.2, 0.2, 0.2, 0.2, 2.0],
        ]
    )
    mask = attention_mask(attn_map, (2, 3), (4, 6), threshold=1.0)
    small = torch.tensor(
        [
            [[0.0, 0.0, 1.0], [1.0, 0.0, 1.0]],
            [[1.0, 0.0, 0.0], [0.0, 0.0, 1.0]],
        ]
    )
    expected = small.repeat_interleave(2, dim=1).repeat_interleave(2, dim=2)[:, None]
    assert mask.shape == (2, 1, 4, 6)
    assert mask.dtype == attn_map.dtype
    assert torch.equal(mask, expected)
    # Another threshold moves the boundary: only 2.0 (row 0) and 3.0, 2.0 (row 1) exceed 1.6.
    mask2 = attention_mask(attn_map, (2, 3), (4, 6), threshold=1.6)
    assert mask2.sum().item() == 4 * 3
    assert mask2[0, 0, 0, 4:].eq(0).all() and mask2[0, 0, 2:, :2].eq(1).all()


def test_combine_attention_maps():
    m = _randn(2, 6).abs()
    up = combine_attention_maps([(m, (2, 3))], (4, 6))
    expected = m.reshape(2, 2, 3).repeat_interleave(2, 1).repeat_interleave(2, 2)[:, None]
    assert torch.equal(up, expected)
    # Two layers at different resolutions: the mean of both, each upsampled.
    m2 = _randn(2, 24, seed=1).abs()
    both = combine_attention_maps([(m, (2, 3)), (m2, (4, 6))], (4, 6))
    torch.testing.assert_close(both, (expected + m2.reshape(2, 1, 4, 6)) / 2)


@pytest.mark.parametrize("fraction", [0.1, 0.4, 0.75])
def test_random_mask_fraction_and_determinism(fraction):
    a = random_mask((2, 1, 64, 64), fraction, _gen(3))
    b = random_mask((2, 1, 64, 64), fraction, _gen(3))
    c = random_mask((2, 1, 64, 64), fraction, _gen(4))
    assert a.shape == (2, 1, 64, 64)
    assert set(a.unique().tolist()) <= {0.0, 1.0}
    for i in range(2):
        assert abs(a[i].mean().item() - fraction) < 0.05
    assert torch.equal(a, b)
    assert not torch.equal(a, c)


@pytest.mark.parametrize(("h", "w", "fraction"), [(32, 48, 0.25), (64, 64, 0.4), (16, 16, 0.1)])
def test_square_mask_is_one_square_of_requested_size(h, w, fraction):
    b = 3
    mask = square_mask((b, 1, h, w), fraction, _gen(7))
    side = round(math.sqrt(fraction * h * w))
    assert mask.shape == (b, 1, h, w)
    for i in range(b):
        m = mask[i, 0]
        assert m.sum().item() == side * side
        # Within rounding of the side: |side - sqrt(f h w)| <= 1/2.
        assert abs(math.sqrt(m.sum().item()) - math.sqrt(fraction * h * w)) <= 0.5
        rows = m.any(1).nonzero().flatten()
        cols = m.any(0).nonzero().flatten()
        assert rows.numel() == side and cols.numel() == side
        assert rows[-1] - rows[0] == side - 1 and cols[-1] - cols[0] == side - 1
        # The bounding box is completely filled: one contiguous square.
        assert m[rows[0] : rows[-1] + 1, cols[0] : cols[-1] + 1].all()
    assert torch.equal(mask, square_mask((b, 1, h, w), fraction, _gen(7)))
    assert not torch.equal(mask, square_mask((b, 1, h, w), fraction, _gen(8)))


def test_highfreq_mask_finds_noisy_patch():
    h = w = 64
    y = torch.arange(h, dtype=torch.float32)[:, None]
    x = torch.arange(w, dtype=torch.float32)[None, :]
    # Periodic and low-frequency, so the high-pass removes it entirely.
    smooth = torch.sin(2 * math.pi * x / w) * torch.cos(2 * math.pi * y / h)
    img = smooth.expand(1, 3, h, w).clone()
    top, left, side = 12, 30, 16
    img[:, :, top : top + side, left : left + side] += _randn(1, 3, side, side, seed=5)
    fraction = side * side / (h * w)
    mask = highfreq_mask(img, fraction)
    assert mask.shape == (1, 1, h, w)
    assert set(mask.unique().tolist()) <= {0.0, 1.0}
    k = round(fraction * h * w)
    assert k <= mask.sum().item() <= k + 2  # ties aside, exactly the top-k pixels
    inside = mask[0, 0, top : top + side, left : left + side].sum().item()
    assert inside / mask.sum().item() > 0.8


# =========================================================================== attention: maps


def _exact_map_from_qk(query: torch.Tensor, key: torch.Tensor, scale: float) -> torch.Tensor:
    probs = (query.double() @ key.double().transpose(-1, -2) * scale).softmax(-1)
    return probs.mean(1).sum(1).float()


@pytest.mark.parametrize("chunk_elements", [1, 2 * 3 * 10, 2 * 3 * 10 * 3, 2 * 3 * 10 * 7, 10**6])
def test_aggregated_map_chunked_matches_exact(chunk_elements):
    q = _randn(2, 3, 10, 4, seed=1)
    k = _randn(2, 3, 10, 4, seed=2)
    scale = 0.5
    out = aggregated_map_chunked(q, k, scale, chunk_elements=chunk_elements)
    assert out.shape == (2, 10)
    assert out.dtype == torch.float32
    torch.testing.assert_close(out, _exact_map_from_qk(q, k, scale), atol=1e-5, rtol=0)
    torch.testing.assert_close(out.mean(1), torch.ones(2), atol=1e-5, rtol=0)


def _tokens(attn: Attention, x: torch.Tensor) -> torch.Tensor:
    """The (B, N, C) tokens a processor feeds to to_q/to_k/to_v (after the group norm, if any)."""
    if x.ndim == 4:
        b, c, h, w = x.shape
        x = x.view(b, c, h * w).transpose(1, 2)
    if attn.group_norm is not None:
        x = attn.group_norm(x.transpose(1, 2)).transpose(1, 2)
    return x


def _exact_module_map(attn: Attention, x: torch.Tensor) -> torch.Tensor:
    t = _tokens(attn, x)
    b, n, _ = t.shape
    q = attn.to_q(t).view(b, n, attn.heads, -1).transpose(1, 2)
    k = attn.to_k(t).view(b, n, attn.heads, -1).transpose(1, 2)
    return _exact_map_from_qk(q, k, attn.scale)


def _attn_3d(seed: int = 0) -> Attention:
    torch.manual_seed(seed)
    return Attention(query_dim=16, heads=2, dim_head=8).eval()


def _attn_4d(seed: int = 0) -> Attention:
    torch.manual_seed(seed)
    attn = Attention(
        query_dim=32,
        heads=2,
        dim_head=16,
        norm_num_groups=8,
        residual_connection=True,
        bias=True,
        upcast_softmax=True,
        _from_deprecated_attn_block=True,
    ).eval()
    # Non-trivial group-norm affine parameters, so a skipped norm would show.
    with torch.no_grad():
        attn.group_norm.weight.normal_()
        attn.group_norm.bias.normal_()
    return attn


@pytest.mark.parametrize("memory_flat", [False, True])
@torch.no_grad()
def test_capture_processor_3d(memory_flat):
    limits = MapLimits(exact_max_elements=0) if memory_flat else MapLimits()
    attn = _attn_3d()
    x = _randn(2, 10, 16, seed=1)
    assert isinstance(attn.processor, AttnProcessor2_0)
    ref = attn(x)

    state = GuidanceState(capture=True)
    attn.set_processor(_capture("layer", state, limits))
    out = attn(x)
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=0)
    agg, grid = state.maps["layer"]
    assert grid is None
    assert agg.shape == (2, 10)
    torch.testing.assert_close(agg.float(), _exact_module_map(attn, x), atol=1e-5, rtol=0)
    torch.testing.assert_close(agg.mean(1), torch.ones(2), atol=1e-5, rtol=0)

    # Without capture, nothing is recorded and the output is unchanged.
    state.maps.clear()
    state.capture = False
    torch.testing.assert_close(attn(x), ref, atol=1e-5, rtol=0)
    assert state.maps == {}


@pytest.mark.parametrize("memory_flat", [False, True])
@torch.no_grad()
def test_capture_processor_4d_unet_block(memory_flat):
    limits = MapLimits(exact_max_elements=0) if memory_flat else MapLimits()
    attn = _attn_4d()
    x = _randn(2, 32, 4, 6, seed=2)
    ref = AttnProcessor2_0()(attn, x)
    state = GuidanceState(capture=True)
    attn.set_processor(_capture("mid", state, limits))
    out = attn(x)
    assert out.shape == x.shape
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=0)
    agg, grid = state.maps["mid"]
    assert grid == (4, 6)
    assert agg.shape == (2, 24)
    torch.testing.assert_close(agg.float(), _exact_module_map(attn, x), atol=1e-5, rtol=0)


# =========================================================================== attention: PAG identity


@pytest.mark.parametrize("n", [1, 2, 3])
@torch.no_grad()
def test_identity_perturbation_3d(n):
    attn = _attn_3d()
    x = _randn(3, 10, 16, seed=3)
    keep = 3 - n
    state = _pag_rows(n, 3)
    attn.set_processor(_identity(AttnProcessor2_0(), state))
    out = attn(x)
    assert out.shape == x.shape
    if keep:
        torch.testing.assert_close(out[:keep], AttnProcessor2_0()(attn, x[:keep]), atol=1e-5, rtol=0)
    by_hand = attn.to_out[1](attn.to_out[0](attn.to_v(x[keep:])))
    torch.testing.assert_close(out[keep:], by_hand, atol=1e-5, rtol=0)
    # And that really differs from ordinary attention on those rows.
    assert not torch.allclose(out[keep:], AttnProcessor2_0()(attn, x[keep:]), atol=1e-3)


@torch.no_grad()
def test_identity_perturbation_zero_rows_is_pass_through():
    attn = _attn_3d()
    x = _randn(2, 10, 16, seed=4)
    ref = AttnProcessor2_0()(attn, x)
    state = _pag_rows(0, 2)
    attn.set_processor(_identity(AttnProcessor2_0(), state))
    torch.testing.assert_close(attn(x), ref, atol=1e-6, rtol=0)


@torch.no_grad()
def test_identity_perturbation_4d():
    attn = _attn_4d()
    x = _randn(3, 32, 4, 6, seed=5)
    state = _pag_rows(1, 3)
    attn.set_processor(_identity(AttnProcessor2_0(), state))
    out = attn(x)
    assert out.shape == x.shape
    torch.testing.assert_close(out[:2], AttnProcessor2_0()(attn, x[:2]), atol=1e-5, rtol=0)
    t = _tokens(attn, x[2:])
    v = attn.to_out[1](attn.to_out[0](attn.to_v(t)))
    by_hand = v.transpose(1, 2).reshape(1, 32, 4, 6) + x[2:]  # residual connection
    torch.testing.assert_close(out[2:], by_hand / attn.rescale_output_factor, atol=1e-5, rtol=0)


# =========================================================================== attention: layer selection


class _Block(nn.Module):
    def __init__(self, cross: bool = False):
        super().__init__()
        self.attn1 = Attention(query_dim=8, heads=1, dim_head=8)
        if cross:
            self.attn2 = Attention(query_dim=8, cross_attention_dim=12, heads=1, dim_head=8)


class _Transformer(nn.Module):
    def __init__(self):
        super().__init__()
        self.transformer_blocks = nn.ModuleList([_Block(cross=True)])


class _MidBlock(nn.Module):
    def __init__(self):
        super().__init__()
        self.attentions = nn.ModuleList([_Transformer()])


class _ToyModel(nn.Module):
    def __init__(self, n_blocks: int = 12, mid: bool = True):
        super().__init__()
        self.blocks = nn.ModuleList([_Block(cross=(i == 1)) for i in range(n_blocks)])
        if mid:
            self.mid_block = _MidBlock()


MID = "mid_block.attentions.0.transformer_blocks.0.attn1"
CROSS = ("blocks.1.attn2", "mid_block.attentions.0.transformer_blocks.0.attn2")


@pytest.fixture(scope="module")
def toy_model() -> _ToyModel:
    model = _ToyModel()
    names = dict(model.named_modules())
    assert all(names[c].is_cross_attention for c in CROSS)
    return model


@pytest.mark.parametrize(
    ("pattern", "expected"),
    [
        ("blocks.1", ["blocks.1.attn1"]),
        ("blocks.1.", ["blocks.1.attn1"]),
        (r"blocks\.1\.", ["blocks.1.attn1"]),
        ("blocks.1[01].attn1", ["blocks.10.attn1", "blocks.11.attn1"]),
        ("blocks.(1|10)", ["blocks.1.attn1", "blocks.10.attn1"]),
        ("blocks.1.attn1", ["blocks.1.attn1"]),
        ("blocks.10.attn1", ["blocks.10.attn1"]),
        (MID, [MID]),
        ("mid_block.attentions.0", [MID]),
        ("mid", [MID]),
        (["blocks.10", "blocks.1"], ["blocks.1.attn1", "blocks.10.attn1"]),  # model order
        ("blocks.1[01]", ["blocks.10.attn1", "blocks.11.attn1"]),
    ],
)
def test_resolve_layers_selection(toy_model, pattern, expected):
    chosen = resolve_layers(toy_model, pattern)
    assert chosen == expected
    assert not set(chosen) & set(CROSS)


def test_resolve_layers_never_selects_cross_attention(toy_model):
    assert set(resolve_layers(toy_model, "attn")).isdisjoint(CROSS)
    assert len(resolve_layers(toy_model, "attn")) == 13  # 12 blocks + mid
    with pytest.raises(ValueError, match="matches no self-attention layer"):
        resolve_layers(toy_model, "attn2")
    with pytest.raises(ValueError, match="matches no self-attention layer"):
        resolve_layers(toy_model, CROSS[0])


def test_resolve_layers_no_match_lists_layers(toy_model):
    with pytest.raises(ValueError) as info:
        resolve_layers(toy_model, "down_blocks.7", argument="pag_applied_layers")
    msg = str(info.value)
    assert "'down_blocks.7'" in msg
    assert "pag_applied_layers" in msg
    for i in range(12):
        assert f"blocks.{i}.attn1" in msg
    assert MID in msg
    for c in CROSS:
        assert c not in msg


def test_resolve_layers_invalid_regex(toy_model):
    with pytest.raises(ValueError, match=r"not a valid pattern") as info:
        resolve_layers(toy_model, "blocks.(")
    assert "'blocks.('" in str(info.value)


@pytest.mark.parametrize("bad", [[], [""], "", [3]])
def test_resolve_layers_rejects_empty_or_non_string(toy_model, bad):
    with pytest.raises(ValueError):
        resolve_layers(toy_model, bad)


def test_no_self_attention_raises():
    class CrossOnly(nn.Module):
        def __init__(self):
            super().__init__()
            self.attn = Attention(query_dim=8, cross_attention_dim=12, heads=1, dim_head=8)
            self.lin = nn.Linear(8, 8)

    with pytest.raises(ValueError, match="no self-attention"):
        resolve_layers(CrossOnly(), "attn")
    with pytest.raises(ValueError, match="no self-attention"):
        default_sag_layer(CrossOnly())


def test_default_sag_layer(toy_model):
    assert default_sag_layer(toy_model) == MID
    assert default_sag_layer(_ToyModel(n_blocks=5, mid=False)) == "blocks.2.attn1"
    assert default_sag_layer(_ToyModel(n_blocks=4, mid=False)) == "blocks.2.attn1"


class _VideoBlock(nn.Module):
    def __init__(self):
        super().__init__()
        self.attentions = nn.ModuleList([_Block(cross=False)])
        self.motion_modules = nn.ModuleList([_Block(cross=False)])


def test_default_layers_per_family(toy_model):
    """diffusers' PAG defaults: the mid block in UNets ("mid"), "blocks.1" in transformers (block 1 only,
    not 10-19); spatial layers only (video motion modules are selectable, never the default)."""
    assert default_pag_layers(toy_model) == [MID]
    assert default_pag_layers(_ToyModel(n_blocks=12, mid=False)) == ["blocks.1.attn1"]
    video = nn.Module()
    video.mid_block = _VideoBlock()
    assert default_pag_layers(video) == ["mid_block.attentions.0.attn1"]
    assert default_sag_layer(video) == "mid_block.attentions.0.attn1"
    assert resolve_layers(video, "motion_modules") == ["mid_block.motion_modules.0.attn1"]


# =========================================================================== attention: processor swap


class _ModuleProcessor(nn.Module):
    """A processor with weights (an nn.Module), wrapping the default one."""

    def __init__(self):
        super().__init__()
        self.gain = nn.Parameter(torch.ones(()))
        self.inner = AttnProcessor2_0()

    def forward(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, temb=None):
        out = self.inner(attn, hidden_states, encoder_hidden_states, attention_mask, temb)
        return out * self.gain


def test_processor_swap_restores_on_exit_and_on_error():
    model = _ToyModel(n_blocks=3)
    names = ["blocks.0.attn1", "blocks.2.attn1", MID]
    modules = dict(model.named_modules())
    originals = {n: modules[n].processor for n in names}
    state = GuidanceState()

    with ProcessorSwap(model) as swap:
        swap.install(names[0], lambda old: guided_attention(old, names[0], state, capture=True))
        swap.install(names[1], lambda old: _identity(old, state))
        assert isinstance(modules[names[0]].processor, GuidedAttention)
        assert modules[names[0]].processor.inner is originals[names[0]]
        assert modules[names[1]].processor.inner is originals[names[1]]
        with pytest.raises(ValueError, match="already guided"):  # a second guided run on the same layer
            ProcessorSwap(model).install(names[0], lambda old: _identity(old, state))
    for n in names:
        assert modules[n].processor is originals[n]

    with pytest.raises(RuntimeError, match="boom"), ProcessorSwap(model) as swap:
        swap.install(names[2], lambda old: _identity(old, state))
        assert modules[names[2]].processor is not originals[names[2]]
        raise RuntimeError("boom")
    for n in names:
        assert modules[n].processor is originals[n]


@torch.no_grad()
def test_processor_swap_restores_module_processor():
    model = _ToyModel(n_blocks=2, mid=False)
    attn = model.blocks[1].attn1
    proc = _ModuleProcessor()
    attn.set_processor(proc)
    assert attn._modules["processor"] is proc
    n_params = len(list(model.parameters()))
    x = _randn(1, 5, 8, seed=6)
    ref = attn(x)

    state = GuidanceState(capture=True)
    with ProcessorSwap(model) as swap:
        name = "blocks.1.attn1"
        swap.install(name, lambda old: guided_attention(old, name, state, capture=True))
        assert "processor" not in attn._modules
        assert len(list(model.parameters())) == n_params - 1
        attn(x)
        assert "blocks.1.attn1" in state.maps
    assert attn.processor is proc
    assert attn._modules["processor"] is proc
    assert len(list(model.parameters())) == n_params
    torch.testing.assert_close(attn(x), ref)


# =========================================================================== denoiser


@pytest.mark.parametrize("abar_value", [0.02, 0.3, 0.5, 0.9, 0.995])
@pytest.mark.parametrize("prediction_type", PREDICTION_TYPES)
def test_predict_x0_eps_round_trip(prediction_type, abar_value):
    x0 = _randn(2, 4, 8, 8, seed=1)
    eps = _randn(2, 4, 8, 8, seed=2)
    abar = torch.tensor(abar_value)
    if prediction_type == "flow":  # x = (1 - sigma) x0 + sigma eps, velocity v = eps - x0
        level = NoiseLevel.flow(abar)
        x = renoise(x0, eps, level)
        torch.testing.assert_close(x, (1 - abar) * x0 + abar * eps)
    else:
        level = _vp(abar)
        x = renoise(x0, eps, level)
        torch.testing.assert_close(x, abar.sqrt() * x0 + (1 - abar).sqrt() * eps)
    model_output = {
        "epsilon": eps,
        "v_prediction": abar.sqrt() * eps - (1 - abar).sqrt() * x0,
        "sample": x0,
        "flow": eps - x0,
    }[prediction_type]
    torch.testing.assert_close(predict_x0(x, model_output, level, prediction_type), x0, atol=1e-5, rtol=0)
    torch.testing.assert_close(predict_eps(x, model_output, level, prediction_type), eps, atol=1e-5, rtol=0)


def test_predict_unknown_type_raises():
    x = torch.zeros(1, 1, 2, 2)
    with pytest.raises(ValueError, match="prediction_type"):
        predict_x0(x, x, _vp(0.5), "bogus")
    with pytest.raises(ValueError, match="prediction_type"):
        predict_eps(x, x, _vp(0.5), "bogus")


def test_layout_split_learned_variance():
    layout = LatentLayout.from_channels(4, 8)
    assert layout == LatentLayout(4, 0, True)
    out2 = _randn(2, 8, 3, 3)
    pred, var = layout.split_output(out2)
    assert torch.equal(pred, out2[:, :4]) and torch.equal(var, out2[:, 4:])
    pred, var = LatentLayout.from_channels(4, 4).split_output(out2[:, :4])
    assert var is None
    with pytest.raises(ValueError, match="12 channels"):
        layout.split_output(_randn(2, 12, 3, 3))


@pytest.mark.parametrize(
    ("channels", "expected"),
    [
        ((9, 4), LatentLayout(4, 5, False)),  # SD inpainting: latent + mask + masked-image latents
        ((7, 4), LatentLayout(4, 3, False)),  # SD x4 upscaler: latent + low-resolution image
        ((3, 6), LatentLayout(3, 0, True)),  # pixel UNet with a learned variance
        ((4, 8), LatentLayout(4, 0, True)),  # DiT, learned sigma
    ],
)
def test_layout_from_channels(channels, expected):
    assert LatentLayout.from_channels(*channels) == expected
    # DeepFloyd IF stage II: 3 + 3 in, prediction + variance out, known from the scheduler
    assert LatentLayout.from_channels(6, 6, variance=True) == LatentLayout(3, 3, True)
    with pytest.raises(ValueError, match="cannot place"):
        LatentLayout.from_channels(4, 5)


def test_layout_keeps_conditioning_channels_and_frames():
    layout = LatentLayout.from_channels(9, 4)
    x = _randn(2, 9, 4, 4)
    latent, cond = layout.split_input(x)
    assert latent.shape[1] == 4 and cond.shape[1] == 5
    assert torch.equal(layout.join_input(latent, cond), x)
    video = _randn(2, 4, 3, 5, 6)  # (B, C, F, H, W)
    frames = as_images(video)
    assert frames.shape == (6, 4, 5, 6)
    assert torch.equal(frames[4], video[1, :, 1])  # batch-major frames
    assert torch.equal(from_images(frames, video), video)
    with pytest.raises(ValueError, match="channels"):
        layout.check_input(_randn(1, 4, 4, 4))
    with pytest.raises(ValueError, match="understand"):
        layout.check_input(_randn(1, 9, 4))


def test_uses_sigma_schedule():
    ddim = DDIMScheduler()
    ddim.set_timesteps(10)
    assert not torch.is_floating_point(ddim.timesteps)
    assert uses_sigma_schedule(ddim, ddim.timesteps) is False

    euler = EulerDiscreteScheduler()
    euler.set_timesteps(10)
    assert uses_sigma_schedule(euler, euler.timesteps) is True

    karras = DPMSolverMultistepScheduler(use_karras_sigmas=True)
    karras.set_timesteps(10)
    assert not torch.is_floating_point(karras.timesteps)
    assert uses_sigma_schedule(karras, karras.timesteps) is True

    plain = DPMSolverMultistepScheduler()
    plain.set_timesteps(10)
    assert uses_sigma_schedule(plain, plain.timesteps) is False


def test_alpha_bar_sigma_route_agrees_with_alphas_route():
    sched = EulerDiscreteScheduler(
        beta_schedule="scaled_linear",
        beta_start=0.00085,
        beta_end=0.012,
        timestep_spacing="leading",
        steps_offset=1,
    )
    sched.set_timesteps(10)
    ts = sched.timesteps
    assert torch.equal(ts, ts.round()), "the timesteps must land on integers for this comparison"
    sample = _randn(1, 4, 4, 4) * sched.init_noise_sigma
    seen = []
    for t in ts:
        sched.scale_model_input(sample, t)
        abar_sigma = alpha_bar_at(sched, t, sigma_schedule=True)
        abar_alphas = alpha_bar_at(sched, t, sigma_schedule=False)
        assert abar_sigma.ndim == 0 and abar_sigma.dtype == torch.float32
        expected = sched.alphas_cumprod[round(float(t))]
        torch.testing.assert_close(abar_sigma, expected.float(), atol=1e-4, rtol=0)
        torch.testing.assert_close(abar_alphas, expected)
        seen.append(float(abar_sigma))
        sample = sched.step(torch.zeros_like(sample), t, sample).prev_sample
    assert seen == sorted(seen)  # the noise level falls step by step
    assert seen[0] < 0.1 < 0.9 < seen[-1]


def test_alpha_bar_at_karras_first_step_without_step_index():
    sched = DPMSolverMultistepScheduler(use_karras_sigmas=True)
    sched.set_timesteps(10)
    assert sched.step_index is None  # DPM-Solver's scale_model_input does not set it
    t = sched.timesteps[0]
    abar = alpha_bar_at(sched, t, sigma_schedule=True)
    torch.testing.assert_close(abar, 1.0 / (1.0 + sched.sigmas[0].float() ** 2))


# =========================================================================== guidance formulas


@pytest.fixture(scope="module")
def outs():
    return {name: _randn(2, 4, 6, 6, seed=i) for i, name in enumerate(["c", "u", "d", "p"])}


def _delta(term, c, weak, u=None):
    """A term's share of the guided prediction (its ``delta``) for conditional output ``c``, its weak
    prediction ``weak`` and, with CFG, the unconditional output ``u``."""
    outputs = StepOutputs(c, u, weak={term.name: weak})
    ctx = StepContext(
        x_in=c, t=torch.tensor(999), outputs=outputs, cfg=u is not None, layout=None,
        prediction_type="epsilon", level=None, call=None, maps={}, capture_layers=lambda name: [],
        generator=None, record_mask=lambda mask: None,
    )  # fmt: skip
    return term.delta(ctx)


def test_combine_formulas(outs):
    c, u, d, p = outs["c"], outs["u"], outs["d"], outs["p"]
    w, s, sp = 7.5, 0.75, 3.0
    close = torch.testing.assert_close
    sag, pag = SAG(scale=s), PAG(scale=sp)

    assert combine(c) is c
    close(combine(c, u, w), u + w * (c - u))
    close(combine(c, deltas=[_delta(sag, c, d)]), c + s * (c - d))
    close(combine(c, u, w, [_delta(sag, c, d, u)]), u + w * (c - u) + s * (u - d))
    close(combine(c, u, w, [_delta(pag, c, p, u)]), u + w * (c - u) + sp * (c - p))
    close(combine(c, deltas=[_delta(pag, c, p)]), c + sp * (c - p))
    close(
        combine(c, u, w, [_delta(sag, c, d, u), _delta(pag, c, p, u)]),
        u + w * (c - u) + s * (u - d) + sp * (c - p),
    )
    # Guidance scale 1 with CFG is the conditional prediction.
    close(combine(c, u, 1.0), c)


@pytest.mark.parametrize("phi", [0.0, 0.3, 0.7, 1.0])
def test_rescale_cfg_equals_diffusers(outs, phi):
    guided = outs["u"] + 7.5 * (outs["c"] - outs["u"])
    ours = rescale_cfg(guided, outs["c"], phi)
    torch.testing.assert_close(ours, rescale_noise_cfg(guided, outs["c"], guidance_rescale=phi))
    if phi == 1.0:  # fully rescaled: the std of the conditional prediction, per sample
        torch.testing.assert_close(ours.std(dim=(1, 2, 3)), outs["c"].std(dim=(1, 2, 3)))


@pytest.mark.parametrize("prediction_type", PREDICTION_TYPES)
def test_sag_degraded_input(prediction_type):
    x_in = _randn(2, 4, 16, 16, seed=1)
    model_output = _randn(2, 4, 16, 16, seed=2)
    abar = NoiseLevel.flow(0.42) if prediction_type == "flow" else _vp(0.42)  # M = 0 gives x_t in any family
    zeros = torch.zeros(2, 1, 16, 16)
    ones = torch.ones(2, 1, 16, 16)

    out0 = sag_degraded_input(x_in, model_output, abar, prediction_type, zeros)
    torch.testing.assert_close(out0, x_in, atol=1e-5, rtol=0)

    x0 = predict_x0(x_in, model_output, abar, prediction_type)
    eps = predict_eps(x_in, model_output, abar, prediction_type)
    out1 = sag_degraded_input(x_in, model_output, abar, prediction_type, ones, 5, 1.3)
    torch.testing.assert_close(out1, renoise(gaussian_blur_2d(x0, 5, 1.3), eps, abar), atol=1e-5, rtol=0)

    # A partial mask equals the paper's x_t-space form: M * renoise(blur(x0)) + (1 - M) * x_t.
    mask = random_mask((2, 1, 16, 16), 0.5, _gen(9))
    out_m = sag_degraded_input(x_in, model_output, abar, prediction_type, mask)
    blurred_xt = renoise(gaussian_blur_2d(x0, 9, 1.0), eps, abar)
    torch.testing.assert_close(out_m, mask * blurred_xt + (1 - mask) * x_in, atol=1e-5, rtol=0)


def test_sag_degraded_input_epsilon_by_hand():
    x_in = _randn(1, 3, 12, 12, seed=3)
    eps = _randn(1, 3, 12, 12, seed=4)
    a = 0.3
    x0_hat = (x_in - math.sqrt(1 - a) * eps) / math.sqrt(a)
    expected = math.sqrt(a) * ref_gaussian_blur_2d(x0_hat, 9, 1.0) + math.sqrt(1 - a) * eps
    out = sag_degraded_input(x_in, eps, _vp(a), "epsilon", torch.ones(1, 1, 12, 12))
    torch.testing.assert_close(out, expected, atol=1e-5, rtol=0)


@pytest.mark.parametrize("bad", [-1, -0.5, float("nan"), float("inf"), float("-inf"), "1", True, None])
def test_check_scale_rejects(bad):
    with pytest.raises(ValueError, match="`my_scale`"):
        check_scale("my_scale", bad)


def test_check_scale_accepts():
    assert check_scale("s", 0) == 0.0
    assert isinstance(check_scale("s", 3), float)
    assert check_scale("s", -2.5, minimum=-math.inf) == -2.5
    with pytest.raises(ValueError, match="`s`"):
        check_scale("s", 0.5, minimum=1.0)


@pytest.mark.parametrize(
    ("kwargs", "argument"),
    [
        ({"blur_kernel_size": 8}, "sag_blur_kernel_size"),
        ({"blur_kernel_size": 0}, "sag_blur_kernel_size"),
        ({"blur_kernel_size": True}, "sag_blur_kernel_size"),
        ({"blur_sigma": 0}, "sag_blur_sigma"),
        ({"blur_sigma": -1.0}, "sag_blur_sigma"),
        ({"mask": "blurry"}, "sag_mask"),
        ({"window": (0.5, 0.2)}, "sag_window"),
        ({"window": (-0.1, 0.5)}, "sag_window"),
        ({"scale": float("nan")}, "sag_scale"),
        ({"threshold": float("inf")}, "sag_threshold"),
        ({"mask_fraction": 0.0}, "sag_mask_fraction"),
    ],
)
def test_sag_validation(kwargs, argument):
    with pytest.raises(ValueError, match=f"`{argument}`"):
        SAG(**kwargs)


def test_sag_and_pag_valid_configurations():
    assert SAG().needs_map
    assert not SAG(mask="global").needs_map
    assert SAG(scale=-0.5, blur_kernel_size=1, window=(0.2, 0.2)).scale == -0.5
    with pytest.raises(ValueError, match="`pag_adaptive_scale`"):
        PAG(adaptive_scale=-0.1)
    with pytest.raises(ValueError, match="`pag_window`"):
        PAG(window=(0.0, 1.5))


def test_pag_scale_at():
    pag = PAG(scale=3.0, adaptive_scale=0.01)
    for t in [1000, 950, 900, 800, 700, 500, 0]:
        expected = max(0.0, 3.0 - 0.01 * (1000 - t))
        assert pag.scale_at(t) == pytest.approx(expected)
        assert pag.scale_at(torch.tensor(t)) == pytest.approx(expected)
    assert pag.scale_at(900) == pytest.approx(2.0)
    assert pag.scale_at(500) == 0.0
    assert PAG(scale=3.0).scale_at(1) == 3.0  # no adaptive scale: constant


def test_in_window():
    assert all(in_window((0.0, 1.0), s, 10) for s in range(10))
    inside = [s for s in range(10) if in_window((0.2, 0.6), s, 10)]
    assert inside == [2, 3, 4, 5]  # start inclusive, stop exclusive
    assert [s for s in range(10) if in_window((0.5, 1.0), s, 10)] == [5, 6, 7, 8, 9]
    assert not any(in_window((0.3, 0.3), s, 10) for s in range(10))
    assert in_window((0.0, 0.5), 0, 1) and not in_window((0.5, 1.0), 0, 1)


@torch.no_grad()
def test_linear_attention_map_equals_the_explicit_matrix():
    """Sana's ReLU-kernel attention: the O(N d) map equals the column sums of the explicit N x N matrix
    A_ij = phi(q_i) . phi(k_j) / sum_j' phi(q_i) . phi(k_j'), averaged over heads and scaled to mean 1."""
    from attnguide.engine.attention import linear_attention_map

    torch.manual_seed(0)
    attn = Attention(query_dim=16, heads=2, dim_head=8).eval()
    x = _randn(3, 12, 16, seed=7)
    got = linear_attention_map(attn, x)
    q = torch.relu(attn.to_q(x)).view(3, 12, 2, 8).transpose(1, 2)
    k = torch.relu(attn.to_k(x)).view(3, 12, 2, 8).transpose(1, 2)
    a = q @ k.transpose(-1, -2)
    a = a / (a.sum(-1, keepdim=True) + 1e-15)  # a query whose kernel is all zero attends to nothing
    want = a.sum(2).mean(1)
    torch.testing.assert_close(got, want / want.mean(1, keepdim=True), atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(got.mean(1), torch.ones(3), atol=1e-5, rtol=0)


# =========================================================================== random token-block mask


@pytest.mark.parametrize(("size", "grid", "fraction"), [((28, 28), (7, 7), 0.41), ((16, 24), (4, 6), 0.25)])
def test_random_token_mask_fraction_blocks_and_determinism(size, grid, fraction):
    """Whole tokens: constant on each (H/h) x (W/w) block, round(f h w) tokens per image, fixed by seed."""
    from attnguide.engine.degrade import random_token_mask

    (h, w), (gh, gw), b = size, grid, 3
    mask = random_token_mask((b, 1, h, w), grid, fraction, _gen(5))
    assert mask.shape == (b, 1, h, w) and set(mask.unique().tolist()) == {0.0, 1.0}
    blocks = mask.reshape(b, gh, h // gh, gw, w // gw)
    assert (blocks == blocks[:, :, :1, :, :1]).all()
    k = round(fraction * gh * gw)
    tokens = blocks[:, :, 0, :, 0]
    assert (tokens.sum(dim=(1, 2)) == k).all()
    torch.testing.assert_close(mask.mean(dim=(1, 2, 3)), torch.full((b,), k / (gh * gw)))
    # The same blocks as the attention mask's upsampling of a map on that grid (Eq. 13-14).
    as_map = (2 * tokens).reshape(b, gh * gw)
    assert torch.equal(attention_mask(as_map, grid, size), mask)
    assert torch.equal(mask, random_token_mask((b, 1, h, w), grid, fraction, _gen(5)))
    assert not torch.equal(mask, random_token_mask((b, 1, h, w), grid, fraction, _gen(6)))


def test_random_token_mask_uneven_blocks_and_validation():
    from attnguide.engine.degrade import random_token_mask

    mask = random_token_mask((2, 1, 7, 7), (4, 4), 0.01, _gen(1))  # 7 px over 4 tokens: ceil grids
    first = [min(y for y in range(7) if y * 4 // 7 == i) for i in range(4)]  # each token's first pixel
    tokens = mask[:, :, first][:, :, :, first]
    assert (tokens.sum(dim=(1, 2, 3)) == 1).all()  # at least one token, however small the fraction
    assert torch.equal(attention_mask(2 * tokens.reshape(2, 16), (4, 4), (7, 7)), mask)
    for grid in ((0, 4), (4,), (8, 4), (2.0, 2)):
        with pytest.raises(ValueError, match="`grid`"):
            random_token_mask((1, 1, 7, 7), grid, 0.5)
    for fraction in (0.0, 1.5):
        with pytest.raises(ValueError, match="`fraction`"):
            random_token_mask((1, 1, 7, 7), (7, 7), fraction)


def test_sag_random_tokens_mask_is_validated_and_captures_the_map():
    sag = SAG(mask="random_tokens", mask_fraction=0.3)
    assert sag.needs_map  # the grid comes from the captured map
    with pytest.raises(ValueError, match="`sag_mask`"):
        SAG(mask="random_token")
    with pytest.raises(ValueError, match="`sag_mask_fraction`"):
        SAG(mask="random_tokens", mask_fraction=0.0)
