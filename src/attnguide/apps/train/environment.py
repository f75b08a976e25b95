"""Where a training run happens and what it records about it: the device, the library versions and the
command line that reproduces it."""

from __future__ import annotations

import platform
import shlex
import sys
from collections.abc import Sequence

import torch

__all__ = ["COMMAND", "command_line", "device_name", "library_versions", "pick_device"]

#: The command that runs training (recorded, with its arguments, so that a run can be repeated).
COMMAND = ("attnguide", "train")


def pick_device(device: str | None) -> torch.device:
    """``device`` as a :class:`torch.device`; ``None``, ``""`` or ``"auto"`` mean CUDA when available."""
    if device in (None, "", "auto"):
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)


def device_name(device: torch.device) -> str:
    """A readable name of the hardware behind ``device`` (the GPU model, or the CPU)."""
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return platform.processor() or "cpu"


def library_versions() -> dict[str, str]:
    """Versions of torch, diffusers, Python and (when installed) mlxtend, for the training records."""
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


def command_line(argv: Sequence[str] | None) -> str:
    """The shell command that repeats a run with arguments ``argv`` (``None``: this process's own)."""
    args = list(sys.argv[1:]) if argv is None else list(argv)
    return shlex.join([*COMMAND, *args])
