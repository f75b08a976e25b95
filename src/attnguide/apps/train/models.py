"""The models that training builds: the class-conditional MNIST UNet and its noise schedule, and the
small digit classifier (with its loader) that the evaluator uses as a feature extractor."""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

__all__ = [
    "NULL_LABEL",
    "NUM_CLASS_EMBEDS",
    "DigitClassifier",
    "load_digit_classifier",
    "make_digit_classifier",
    "make_mnist_scheduler",
    "make_mnist_unet",
]

#: Class label that means "no class" (used for the unconditional branch of classifier-free guidance).
NULL_LABEL = 10
#: Number of class embeddings of the UNet: the ten digits plus :data:`NULL_LABEL`.
NUM_CLASS_EMBEDS = 11


def make_mnist_unet(
    block_out_channels: Sequence[int] = (32, 64, 64),
    layers_per_block: int = 1,
    attention_head_dim: int = 16,
    norm_num_groups: int = 8,
) -> Any:
    """Build the class-conditional 28x28 :class:`diffusers.UNet2DModel` (randomly initialised).

    Resolutions are 28 -> 14 -> 7: the first block is a plain ``DownBlock2D`` at 28x28, the next two are
    ``AttnDownBlock2D`` (self-attention at 14x14 and 7x7), the mid block has self-attention at 7x7, and the
    up path mirrors it. ``num_class_embeds`` is 11: labels 0..9 plus :data:`NULL_LABEL`.

    Args:
        block_out_channels: channels of the three resolution levels.
        layers_per_block: ResNet layers per down block (up blocks get one more).
        attention_head_dim: channels per attention head.
        norm_num_groups: GroupNorm groups.

    Returns:
        A ``diffusers.UNet2DModel``; call it as ``unet(x, t, class_labels=y).sample``.
    """
    from diffusers import UNet2DModel

    return UNet2DModel(
        sample_size=28,
        in_channels=1,
        out_channels=1,
        block_out_channels=tuple(block_out_channels),
        down_block_types=("DownBlock2D", "AttnDownBlock2D", "AttnDownBlock2D"),
        up_block_types=("AttnUpBlock2D", "AttnUpBlock2D", "UpBlock2D"),
        layers_per_block=layers_per_block,
        attention_head_dim=attention_head_dim,
        norm_num_groups=norm_num_groups,
        num_class_embeds=NUM_CLASS_EMBEDS,
    )


def make_mnist_scheduler() -> Any:
    """The training noise schedule: 1000-step linear-beta DDPM, epsilon prediction, clipped samples."""
    from diffusers import DDPMScheduler

    return DDPMScheduler(
        num_train_timesteps=1000,
        beta_schedule="linear",
        prediction_type="epsilon",
        clip_sample=True,
    )


class DigitClassifier(nn.Module):
    """Small CNN for 28x28 digits in ``[-1, 1]``.

    ``conv(32) conv(32) pool -> conv(64) conv(64) pool -> conv(128)`` at 7x7 (:meth:`spatial_features`),
    global average pooling to a 128-d vector (:meth:`features`), and a linear layer to 10 logits
    (:meth:`forward`). Every conv is followed by BatchNorm and ReLU.
    """

    def __init__(self, width: int = 32, feature_dim: int = 128, num_classes: int = 10) -> None:
        super().__init__()

        def block(cin: int, cout: int) -> list[nn.Module]:
            return [
                nn.Conv2d(cin, cout, 3, padding=1, bias=False),
                nn.BatchNorm2d(cout),
                nn.ReLU(inplace=True),
            ]

        self.config = {"width": width, "feature_dim": feature_dim, "num_classes": num_classes}
        self.body = nn.Sequential(
            *block(1, width),
            *block(width, width),
            nn.MaxPool2d(2),  # 14x14
            *block(width, 2 * width),
            *block(2 * width, 2 * width),
            nn.MaxPool2d(2),  # 7x7
            *block(2 * width, feature_dim),
        )
        self.dropout = nn.Dropout(0.2)
        self.head = nn.Linear(feature_dim, num_classes)

    def spatial_features(self, x: Tensor) -> Tensor:
        """The ``(N, 128, 7, 7)`` feature map before global pooling (for sFID-style statistics)."""
        return self.body(x)

    def features(self, x: Tensor) -> Tensor:
        """The ``(N, 128)`` globally average-pooled penultimate features (for FID-style statistics)."""
        return self.spatial_features(x).mean(dim=(2, 3))

    def forward(self, x: Tensor) -> Tensor:
        """Class logits ``(N, 10)`` for images ``(N, 1, 28, 28)`` in ``[-1, 1]``."""
        return self.head(self.dropout(self.features(x)))


def make_digit_classifier(**kwargs: Any) -> DigitClassifier:
    """Build a randomly initialised :class:`DigitClassifier` (keyword arguments go to its constructor)."""
    return DigitClassifier(**kwargs)


def load_digit_classifier(
    path: str | os.PathLike[str], device: str | torch.device = "cpu"
) -> DigitClassifier:
    """Load the trained classifier, in eval mode.

    Args:
        path: the ``classifier/`` folder, or the model folder that contains it.
        device: where to put it.
    """
    from safetensors.torch import load_file

    folder = Path(path)
    if not (folder / "model.safetensors").exists() and (folder / "classifier").is_dir():
        folder = folder / "classifier"
    config = json.loads((folder / "config.json").read_text(encoding="utf-8"))
    model = make_digit_classifier(**config.get("architecture", {}))
    model.load_state_dict(load_file(str(folder / "model.safetensors")))
    return model.to(device).eval()
