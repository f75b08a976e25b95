"""Where things sit in a denoiser's input and output tensors: the latent layout.

A denoiser input can hold more than the noisy latent that is being denoised: inpainting UNets take the
mask and the masked-image latents as extra channels (9 = 4 + 1 + 4), the SD upscalers the low-resolution
image (7 = 4 + 3, 8 = 4 + 4); outputs can carry a learned variance (2C channels: IDDPM, ADM, DiT);
video latents are 5-D (B, C, F, H, W). SAG degrades only the latent channels, frame by frame, and keeps
the conditioning channels of the input as they are. :class:`LatentLayout` says which channels are which
and turns a latent into the batch of 2-D images that the blur and the masks work on.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor


@dataclass(frozen=True)
class LatentLayout:
    """The channel layout of a denoiser's input and output along dim 1.

    in_channels = latent_channels + cond_channels (latent first, then conditioning, as diffusers
    concatenates them); the output has latent_channels, or 2 x latent_channels with ``learned_variance``.
    """

    latent_channels: int
    cond_channels: int = 0
    learned_variance: bool = False

    @classmethod
    def from_channels(cls, in_channels: int, out_channels: int, *, variance: bool = False) -> LatentLayout:
        """The layout of a model with these channel counts. ``variance``: the scheduler reads a learned
        variance (DDPM ``learned`` / ``learned_range``), so the output is split in halves even where it
        has as many channels as the input (DeepFloyd IF stage II: 3 + 3 in, 3 + 3 out)."""
        if in_channels < 1 or out_channels < 1:
            raise ValueError(f"channel counts must be positive, got in={in_channels}, out={out_channels}")
        learned = variance or out_channels == 2 * in_channels
        if out_channels > in_channels and out_channels != 2 * in_channels:
            learned = out_channels % 2 == 0 and out_channels // 2 <= in_channels
        latent = out_channels // 2 if learned else out_channels
        if (learned and out_channels % 2) or latent > in_channels or latent < 1:
            raise ValueError(
                f"attnguide cannot place a denoiser output of {out_channels} channels for an input of "
                f"{in_channels}: it understands C output channels (a prediction) or 2C (a prediction and "
                "a learned variance), for C latent channels followed by conditioning channels in the input"
            )
        return cls(latent, in_channels - latent, learned)

    @property
    def in_channels(self) -> int:
        return self.latent_channels + self.cond_channels

    def check_input(self, x: Tensor) -> None:
        """ValueError where ``x`` is not an image or video latent with this layout's channels."""
        if x.ndim not in (4, 5):
            raise ValueError(
                f"attnguide: the denoiser input has shape {tuple(x.shape)}; SAG and PAG understand image "
                "latents (B, C, H, W) and video latents (B, C, F, H, W)"
            )
        if x.shape[1] != self.in_channels:
            raise ValueError(
                f"attnguide: the denoiser input has {x.shape[1]} channels, its config says {self.in_channels}"
            )

    def split_input(self, x: Tensor) -> tuple[Tensor, Tensor | None]:
        """(latent, conditioning channels or None) of a model input."""
        if not self.cond_channels:
            return x, None
        return x[:, : self.latent_channels], x[:, self.latent_channels :]

    def join_input(self, latent: Tensor, cond: Tensor | None) -> Tensor:
        """A model input from a latent and the conditioning channels of :meth:`split_input`."""
        return latent if cond is None else torch.cat([latent, cond], dim=1)

    def split_output(self, out: Tensor) -> tuple[Tensor, Tensor | None]:
        """(prediction, learned variance or None) of a model output."""
        if out.shape[1] != self.latent_channels * (2 if self.learned_variance else 1):
            raise ValueError(
                f"attnguide: the denoiser returned {out.shape[1]} channels; its layout says "
                f"{self.latent_channels}{' x 2 (learned variance)' if self.learned_variance else ''}"
            )
        if not self.learned_variance:
            return out, None
        return out[:, : self.latent_channels], out[:, self.latent_channels :]


def as_images(x: Tensor) -> Tensor:
    """A (B, C, H, W) view of an image latent, or the (B * F, C, H, W) frames of a (B, C, F, H, W) video
    latent (batch-major, as diffusers' video UNets order their frames)."""
    if x.ndim == 4:
        return x
    b, c, f, h, w = x.shape
    return x.permute(0, 2, 1, 3, 4).reshape(b * f, c, h, w)


def from_images(images: Tensor, like: Tensor) -> Tensor:
    """The inverse of :func:`as_images` for a tensor shaped like ``like`` (channels may differ)."""
    if like.ndim == 4:
        return images
    b, _, f, h, w = like.shape
    return images.reshape(b, f, -1, h, w).permute(0, 2, 1, 3, 4)


def pack_2x2(images: Tensor) -> Tensor:
    """Flux's packed latents: each 2 x 2 patch of a (B, C, H, W) latent becomes one token of 4C features
    (channel-major, then the patch row and column), tokens in row-major order: (B, H/2 * W/2, 4C). The
    same numbers as diffusers' ``FluxPipeline._pack_latents``; conditioning latents packed alike and
    concatenated on the feature axis unpack to extra channels (Flux Control: 16 + 16)."""
    b, c, h, w = images.shape
    if h % 2 or w % 2:
        raise ValueError(f"packed 2x2 latents need even sides, got {h}x{w}")
    x = images.reshape(b, c, h // 2, 2, w // 2, 2).permute(0, 2, 4, 1, 3, 5)
    return x.reshape(b, (h // 2) * (w // 2), c * 4)


def unpack_2x2(tokens: Tensor, grid: tuple[int, int]) -> Tensor:
    """The inverse of :func:`pack_2x2` for a token grid of ``grid`` = (rows, columns) tokens."""
    b, n, f = tokens.shape
    rows, cols = grid
    if n != rows * cols or f % 4:
        raise ValueError(
            f"attnguide: {n} tokens of {f} features are not a {rows}x{cols} grid of packed 2x2 latents"
        )
    x = tokens.reshape(b, rows, cols, f // 4, 2, 2).permute(0, 3, 1, 4, 2, 5)
    return x.reshape(b, f // 4, rows * 2, cols * 2)


def position_grid(ids: Tensor, tokens: int) -> tuple[int, int]:
    """The (rows, columns) grid of ``tokens`` image tokens from their position ids (Flux's ``img_ids``:
    one (frame, row, column) triple per token, row-major). ValueError where they are not one row-major
    grid of exactly these tokens (Flux Kontext appends its reference image's tokens)."""
    ids = ids[-1] if ids.ndim == 3 else ids  # diffusers' deprecated batched ids
    if ids.ndim != 2 or ids.shape[-1] < 3 or ids.shape[0] != tokens:
        raise ValueError(
            f"attnguide: image position ids of shape {tuple(ids.shape)} do not describe the {tokens} image "
            "tokens of this call (one (frame, row, column) triple per token)"
        )
    rows, cols = int(ids[:, 1].max()) + 1, int(ids[:, 2].max()) + 1
    grid = torch.stack(torch.meshgrid(torch.arange(rows), torch.arange(cols), indexing="ij"), dim=-1).reshape(
        -1, 2
    )
    if rows * cols != tokens or not torch.equal(ids[:, 1:3].round().long().cpu(), grid):
        raise ValueError(
            f"attnguide: the {tokens} image tokens of this call are not one row-major {rows}x{cols} grid "
            "(position ids); attnguide guides Flux calls whose tokens are the generated image's only"
        )
    return rows, cols
