"""Image helpers the applications share: pipeline output as uint8, labelled grids, mask overlays."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
from PIL import Image, ImageDraw

__all__ = ["make_grid", "overlay_masks", "sample_shape", "to_uint8"]


def sample_shape(sample_size: int | Sequence[int]) -> tuple[int, int]:
    """A UNet config's ``sample_size`` (an int or a pair) as (height, width)."""
    return (sample_size, sample_size) if isinstance(sample_size, int) else tuple(sample_size)


def to_uint8(images) -> np.ndarray:
    """Images in [0, 1] (N, H, W[, C] with C 1 or 3) as (N, H, W, 3) uint8."""
    arr = np.asarray(images, dtype=np.float32)
    if arr.ndim == 3:
        arr = arr[..., None]
    if arr.shape[-1] == 1:
        arr = np.repeat(arr, 3, axis=-1)
    return (arr.clip(0, 1) * 255).round().astype(np.uint8)


def make_grid(
    columns: dict[str, np.ndarray], scale: int = 1, row_labels: Sequence[str] | None = None
) -> Image.Image:
    """A labelled grid: one column per entry of ``columns`` (N, H, W, 3 uint8 images), rows = same seed."""
    names = list(columns)
    n, h, w, _ = columns[names[0]].shape
    h, w = h * scale, w * scale
    pad, head = 4, 18
    left = max(40, 6 * max(len(s) for s in row_labels) + 8) if row_labels else 0
    col_w = max(w, 8 * max(len(s) for s in names) + 4)
    canvas = Image.new("RGB", (left + len(names) * (col_w + pad) + pad, head + n * (h + pad) + pad), "white")
    draw = ImageDraw.Draw(canvas)
    for j, name in enumerate(names):
        x0 = left + pad + j * (col_w + pad)
        draw.text((x0 + 2, 3), name, fill="black")
        for i in range(n):
            tile = Image.fromarray(columns[name][i]).resize((w, h), Image.NEAREST)
            canvas.paste(tile, (x0 + (col_w - w) // 2, head + pad + i * (h + pad)))
    if row_labels:
        for i, label in enumerate(row_labels):
            draw.text((3, head + pad + i * (h + pad) + h // 2 - 5), label, fill="black")
    return canvas


def overlay_masks(images: np.ndarray, masks: np.ndarray) -> np.ndarray:
    """Red overlay of the mean SAG mask (N, h, w in [0, 1]) on the images (N, H, W, 3 uint8)."""
    out = []
    for img, m in zip(images, masks, strict=True):
        up = (
            np.asarray(Image.fromarray((m * 255).astype(np.uint8)).resize(img.shape[1::-1], Image.NEAREST))
            / 255.0
        )
        base = img.astype(np.float32) * 0.6
        base[..., 0] += 255 * 0.4 * up
        out.append(base.clip(0, 255).astype(np.uint8))
    return np.stack(out)
