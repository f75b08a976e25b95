"""Feature extractors for the metrics in :mod:`attnguide.apps.eval.metrics`.

An extractor is any callable ``extractor(images) -> dict`` that takes images in ``[0, 1]`` as a float
tensor ``(N, C, H, W)`` and returns

- ``"pool"``: ``(N, D)`` pooled features (FID, precision/recall),
- ``"spatial"``: ``(N, D2)`` flattened spatial features (sFID), or absent,
- ``"logits"``: ``(N, K)`` class logits (Inception Score, class accuracy), or absent,

and has a ``name`` (recorded in results) and an ``identity`` (a string that changes when the network
changes, used to key cached reference features).

Two are provided:

- :class:`DigitClassifierExtractor` (default): the small MNIST CNN shipped with the bundled model
  (:func:`attnguide.apps.train.load_digit_classifier`). Offline and fast, but its figures are **not comparable
  with published FIDs**, which use Inception-v3 features of ImageNet-scale images. A second one of
  another architecture and seed (the model's ``classifier-2`` folder) checks that the arms rank the same
  under other features.
- :class:`InceptionExtractor`: Inception-v3 from a TorchScript file that the user provides, in the
  convention of NVIDIA's StyleGAN2-ADA / StyleGAN3 / EDM metrics (``inception-2015-12-05.pt``):
  ``net(uint8 images (N, 3, 299, 299), return_features=True) -> (N, 2048)``. Grey images are repeated to
  RGB and every image is resized to 299 x 299.
"""

from __future__ import annotations

import hashlib
import os
from pathlib import Path
from typing import Protocol, runtime_checkable

import torch
import torch.nn.functional as F
from torch import Tensor

__all__ = [
    "SFID_CHANNELS",
    "DigitClassifierExtractor",
    "FeatureExtractor",
    "InceptionExtractor",
    "extract_features",
]

#: Spatial channels kept for sFID: guided-diffusion keeps the first 7 channels of ``mixed_6/conv``.
SFID_CHANNELS = 7


@runtime_checkable
class FeatureExtractor(Protocol):
    """``extractor(images in [0, 1], (N, C, H, W))`` -> dict of ``pool`` (N, D), ``spatial`` (N, D2) and
    ``logits`` (N, K); ``name`` and ``identity`` (changes with the network's weights)."""

    name: str
    identity: str

    def __call__(self, images: Tensor) -> dict[str, Tensor]: ...


def _file_digest(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()[:16]


class DigitClassifierExtractor:
    """Features of the digit classifier shipped with the bundled MNIST model.

    pool: the 128-d globally pooled penultimate features; spatial: the first :data:`SFID_CHANNELS`
    channels of the 7 x 7 map before pooling, flattened (343-d, the analogue of guided-diffusion's sFID
    features); logits: the 10 digit logits. Images are converted to grey (channel mean) and resized to
    28 x 28 if needed, then mapped to the classifier's input range [-1, 1]. ``folder``: where it was
    loaded from (its ``config.json`` says which digits it trained on), None for a given ``model``.
    """

    name = "digit-classifier"

    def __init__(self, path: str | os.PathLike[str] | None = None, *, model=None, device: str = "cpu"):
        from ..train import load_digit_classifier

        if model is None:
            if path is None:
                raise ValueError("give the classifier folder `path` or a loaded `model`")
            folder = Path(path)
            if not (folder / "model.safetensors").exists() and (folder / "classifier").is_dir():
                folder = folder / "classifier"
            if not (folder / "model.safetensors").exists():
                raise FileNotFoundError(f"no digit classifier (model.safetensors) in {folder}")
            model = load_digit_classifier(folder, device=device)
            self.identity = f"{self.name}:{_file_digest(folder / 'model.safetensors')}"
            self.folder: Path | None = folder
        else:
            self.folder = None
            model = model.to(device).eval()
            digest = hashlib.sha256()
            for k, v in sorted(model.state_dict().items()):
                digest.update(k.encode())
                digest.update(v.detach().cpu().contiguous().numpy().tobytes())
            self.identity = f"{self.name}:{digest.hexdigest()[:16]}"
        self.model = model
        self.device = device

    @torch.no_grad()
    def __call__(self, images: Tensor) -> dict[str, Tensor]:
        x = images.to(self.device, torch.float32)
        if x.shape[1] != 1:
            x = x.mean(dim=1, keepdim=True)
        if tuple(x.shape[-2:]) != (28, 28):
            x = F.interpolate(x, size=(28, 28), mode="bilinear", align_corners=False, antialias=True)
        x = x * 2.0 - 1.0
        spatial = self.model.spatial_features(x)
        pool = spatial.mean(dim=(2, 3))
        logits = self.model.head(pool)  # forward() without dropout (eval mode: identical)
        return {
            "pool": pool.float().cpu(),
            "spatial": spatial[:, :SFID_CHANNELS].flatten(1).float().cpu(),
            "logits": logits.float().cpu(),
        }


class InceptionExtractor:
    """Inception-v3 pool features (2048-d) from a user-provided TorchScript file (NVIDIA convention).

    ``torch.jit.load(path)`` gives a network called as ``net(x, return_features=True)`` with ``x`` uint8
    ``(N, 3, 299, 299)``. Logits for the Inception Score come from ``net(x, no_output_bias=True)`` (the
    1008-way softmax probabilities, as StyleGAN3's IS metric) where the network accepts it; their log is
    returned as ``"logits"``. The TorchScript network does not expose the ``mixed_6/conv`` map, so no
    ``"spatial"`` features (no sFID) are returned.
    """

    name = "inception-v3-torchscript"

    def __init__(self, path: str | os.PathLike[str], *, device: str = "cpu"):
        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(f"no Inception TorchScript file at {path}")
        self.net = torch.jit.load(str(path), map_location=device).eval()
        self.device = device
        self.identity = f"{self.name}:{_file_digest(path)}"
        self._has_probs: bool | None = None

    @staticmethod
    def to_uint8_rgb299(images: Tensor) -> Tensor:
        """[0, 1] float (N, C, H, W) -> uint8 (N, 3, 299, 299): the 8-bit image (as a saved PNG would hold
        it), grey repeated to RGB, bilinear resize. Quantising first keeps the result independent of the
        resize's float rounding (which varies with the thread count): a level sits on an integer, never
        on a rounding boundary."""
        x = (images.float() * 255.0).round().clamp(0, 255) / 255.0
        if x.shape[1] == 1:
            x = x.repeat(1, 3, 1, 1)
        elif x.shape[1] != 3:
            raise ValueError(f"images must have 1 or 3 channels, got {x.shape[1]}")
        if tuple(x.shape[-2:]) != (299, 299):
            x = F.interpolate(x, size=(299, 299), mode="bilinear", align_corners=False)
        return (x * 255.0).round().clamp(0, 255).to(torch.uint8)

    @torch.no_grad()
    def __call__(self, images: Tensor) -> dict[str, Tensor]:
        x = self.to_uint8_rgb299(images).to(self.device)
        out = {"pool": self.net(x, return_features=True).float().cpu()}
        if self._has_probs is not False:
            try:
                probs = self.net(x, no_output_bias=True).float().cpu()
                self._has_probs = True
                out["logits"] = probs.clamp_min(1e-30).log()
            except Exception:  # a network without the softmax head: no IS
                self._has_probs = False
        return out


@torch.no_grad()
def extract_features(extractor: FeatureExtractor, images: Tensor, batch_size: int = 500) -> dict[str, Tensor]:
    """Run ``extractor`` over ``images`` ([0, 1], (N, C, H, W)) in batches; concatenate each output."""
    parts: dict[str, list[Tensor]] = {}
    for i in range(0, images.shape[0], batch_size):
        for key, value in extractor(images[i : i + batch_size]).items():
            parts.setdefault(key, []).append(value)
    return {k: torch.cat(v) for k, v in parts.items()}
