"""Degradations used by the guidance terms: Gaussian blur and the masks that say where to blur.

SAG paper (Hong et al., arXiv:2210.00939), Sec. 5.1 (blur guidance: blur everywhere) and Sec. 5.2,
Eq. 13-15 (SAG: blur where the
aggregated self-attention map exceeds the threshold psi). The masks of the paper's Table 5 ablation
(global, random, square, high-frequency) live here too, so every masking strategy is one function.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import Tensor

MASK_KINDS = ("attention", "global", "random", "random_tokens", "square", "highfreq")

#: A blur strategy: (B, C, H, W) -> (B, C, H, W), e.g. ``functools.partial(gaussian_blur_2d, kernel_size=9,
#: sigma=1.0)`` or :func:`mean_pixel_blur`.
Blur = Callable[[Tensor], Tensor]


def gaussian_kernel_1d(kernel_size: int, sigma: float, *, device=None, dtype=None) -> Tensor:
    """Normalised 1-D Gaussian taps, computed exactly as diffusers' SAG pipeline does (float32 linspace)."""
    half = (kernel_size - 1) * 0.5
    x = torch.linspace(-half, half, steps=kernel_size)
    pdf = torch.exp(-0.5 * (x / sigma).pow(2))
    return (pdf / pdf.sum()).to(device=device, dtype=dtype)


_KERNEL_CACHE: dict[tuple, Tensor] = {}


def gaussian_kernel_2d(kernel_size: int, sigma: float, channels: int, *, device, dtype) -> Tensor:
    """The depthwise (channels, 1, k, k) blur weight, cached per device and dtype.

    Built on the CPU and copied to the device once: a fresh copy at every step would stall the host
    until the device caught up (a host-to-device copy from pageable memory is synchronous).
    """
    key = (kernel_size, float(sigma), channels, str(device), dtype)
    kernel = _KERNEL_CACHE.get(key)
    if kernel is None:
        # Taps rounded to ``dtype`` first, as diffusers does. A product of two 16-bit taps is exact in
        # float32, so each weight is rounded once, like the reference's device-side matrix product.
        k1 = gaussian_kernel_1d(kernel_size, sigma, dtype=dtype)
        k1 = k1.to(torch.promote_types(dtype, torch.float32))
        kernel = torch.mm(k1[:, None], k1[None, :]).to(dtype)
        kernel = kernel.expand(channels, 1, kernel_size, kernel_size).contiguous().to(device)
        if len(_KERNEL_CACHE) > 64:
            _KERNEL_CACHE.clear()
        _KERNEL_CACHE[key] = kernel
    return kernel


def gaussian_blur_2d(img: Tensor, kernel_size: int = 9, sigma: float = 1.0) -> Tensor:
    """Depthwise Gaussian blur of a (B, C, H, W) tensor with reflect padding.

    Numerically the same as diffusers' ``gaussian_blur_2d`` (the SAG reference). Where the image is too
    small for reflect padding (a side not larger than kernel_size // 2), edge replication is used instead
    of failing, which diffusers does not do.
    """
    channels = img.shape[-3]
    kernel2d = gaussian_kernel_2d(kernel_size, sigma, channels, device=img.device, dtype=img.dtype)
    pad = kernel_size // 2
    mode = "reflect" if min(img.shape[-2:]) > pad else "replicate"
    img = F.pad(img, [pad, pad, pad, pad], mode=mode)
    return F.conv2d(img, kernel2d, groups=channels)


def mean_pixel_blur(img: Tensor) -> Tensor:
    """The limit sigma -> infinity of the Gaussian blur: each image's per-channel mean pixel, everywhere.

    A blur strategy for :class:`attnguide.SAG` (``SAG(blur=mean_pixel_blur)``; the SAG paper's Table 6 ends
    its sigma sweep here).
    """
    return img.mean(dim=(-2, -1), keepdim=True).expand_as(img)


def infer_grid(num_tokens: int, height: int, width: int) -> tuple[int, int]:
    """The (h, w) token grid of a layer that sees ``num_tokens`` tokens of an input of size (height, width).

    UNet downsampling (stride-2 conv, padding 1) maps a side s to ceil(s / 2); a transformer's patch
    embedding with patch size p maps it to s / p. Powers of two are tried first (the UNet case), then every
    integer factor. Raises ValueError where no factor fits.
    """
    factors = [2**k for k in range(12)] + list(range(3, max(height, width) + 1))
    for f in factors:
        h, w = math.ceil(height / f), math.ceil(width / f)
        if h * w == num_tokens:
            return h, w
    raise ValueError(
        f"cannot place {num_tokens} attention tokens on a grid for an input of {height}x{width}; "
        "this layer's tokens are not a downsampled image grid"
    )


def attention_mask(
    attn_map: Tensor, grid: tuple[int, int], size: tuple[int, int], threshold: float = 1.0
) -> Tensor:
    """Eq. 13-14: M = 1(Upsample(Reshape(A)) > psi), as a float (B, 1, H, W) mask.

    ``attn_map`` is the aggregated map (B, N): per key, the attention mass it receives, summed over
    queries and averaged over heads (its mean over keys is 1, so psi = 1.0 is the mean, as in the paper).
    Thresholding before nearest upsampling equals thresholding after it.
    """
    b = attn_map.shape[0]
    mask = (attn_map > threshold).reshape(b, 1, grid[0], grid[1]).to(attn_map.dtype)
    return F.interpolate(mask, size)


def combine_attention_maps(maps: list[tuple[Tensor, tuple[int, int]]], size: tuple[int, int]) -> Tensor:
    """Mean of several layers' aggregated maps, each nearest-upsampled to ``size``: (B, 1, H, W).

    Each map has mean 1, so the mean of several keeps the meaning of the threshold psi.
    """
    ups = [F.interpolate(m.reshape(m.shape[0], 1, g[0], g[1]), size) for m, g in maps]
    return torch.stack(ups).mean(0)


def random_mask(
    shape: tuple[int, int, int, int], fraction: float, generator: torch.Generator | None = None
) -> Tensor:
    """Each pixel masked independently with probability ``fraction`` (Table 5, "Random")."""
    b, _, h, w = shape
    u = torch.rand((b, 1, h, w), generator=generator)
    return (u < fraction).float()


def random_token_mask(
    shape: tuple[int, int, int, int],
    grid: tuple[int, int],
    fraction: float,
    generator: torch.Generator | None = None,
) -> Tensor:
    """Random whole attention tokens: ``round(fraction * h * w)`` cells of the (h, w) token ``grid`` per
    image (at least one), drawn without replacement, nearest-upsampled to the image as
    :func:`attention_mask` upsamples the map, so each block is the pixels one attention token covers.

    The masking ablation's random mask at the attention mask's granularity: beside the per-pixel
    :func:`random_mask` it separates "where SAG blurs" from "how coarse its blocks are". A fixed count
    (not a coin per token) keeps the fraction on small grids, such as a 7x7 mid block.
    """
    b, _, h, w = shape
    ints = len(grid) == 2 and all(isinstance(g, int) and not isinstance(g, bool) for g in grid)
    if not ints or not (0 < grid[0] <= h and 0 < grid[1] <= w):
        raise ValueError(f"`grid` must be two positive integers at most the image's {h}x{w}, got {grid!r}")
    if not 0 < fraction <= 1:
        raise ValueError(f"`fraction` must be in (0, 1], got {fraction!r}")
    n = grid[0] * grid[1]
    k = min(n, max(1, round(fraction * n)))
    chosen = torch.rand((b, n), generator=generator).argsort(dim=1)[:, :k]
    tokens = torch.zeros((b, n)).scatter_(1, chosen, 1.0)
    return F.interpolate(tokens.reshape(b, 1, *grid), (h, w))


def square_mask(
    shape: tuple[int, int, int, int], fraction: float, generator: torch.Generator | None = None
) -> Tensor:
    """One axis-aligned square per image covering about ``fraction`` of it, at a random place.

    Table 5, "Square".
    """
    b, _, h, w = shape
    side = max(1, min(h, w, round(math.sqrt(fraction * h * w))))
    mask = torch.zeros((b, 1, h, w))
    tops = torch.randint(0, h - side + 1, (b,), generator=generator)
    lefts = torch.randint(0, w - side + 1, (b,), generator=generator)
    for i in range(b):
        t, l_ = int(tops[i]), int(lefts[i])
        mask[i, :, t : t + side, l_ : l_ + side] = 1
    return mask


def highfreq_mask(x0: Tensor, fraction: float, cutoff: float = 0.25) -> Tensor:
    """Mask the ``fraction`` of pixels with the most high-frequency energy in x0 (Table 5, "High-frequency").

    High-pass: zero the centred FFT inside a disc of radius ``cutoff`` (relative to the Nyquist frequency),
    invert, take the magnitude summed over channels, and keep the top ``fraction`` pixels per image.
    """
    b, _, h, w = x0.shape
    spec = torch.fft.fftshift(torch.fft.fft2(x0.float()), dim=(-2, -1))
    fy = torch.linspace(-1, 1, h, device=x0.device)[:, None]
    fx = torch.linspace(-1, 1, w, device=x0.device)[None, :]
    spec = spec * ((fy**2 + fx**2).sqrt() > cutoff)
    energy = torch.fft.ifft2(torch.fft.ifftshift(spec, dim=(-2, -1))).abs().sum(1).reshape(b, -1)
    k = max(1, round(fraction * h * w))
    kth = energy.topk(k, dim=1).values[:, -1:]
    return (energy >= kth).reshape(b, 1, h, w).to(x0.dtype)
