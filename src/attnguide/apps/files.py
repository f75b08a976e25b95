"""Writing files so that nothing a user made is lost: every write is atomic (a temporary file beside the
target, then one rename), and files get the mode a plain ``open`` would give them."""

from __future__ import annotations

import json
import math
import os
import shutil
import tempfile
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any


def umask_mode(directory: bool = False) -> int:
    """The mode a plain ``open`` / ``mkdir`` would give (``mkstemp`` / ``mkdtemp`` use 0600 / 0700)."""
    umask = os.umask(0)
    os.umask(umask)
    return (0o777 if directory else 0o666) & ~umask


def write_atomic(path: str | os.PathLike[str], write: Callable[[Path], None]) -> None:
    """Write ``path`` atomically: ``write(tmp)`` fills a temporary file beside it, which then replaces
    ``path`` in one rename (readers see the old file or the new one, never half of one)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp" + path.suffix, dir=path.parent)
    os.close(fd)
    try:
        write(Path(tmp))
        os.chmod(tmp, umask_mode())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def write_text_atomic(path: str | os.PathLike[str], text: str) -> None:
    """``path`` holds ``text`` (UTF-8), written atomically."""
    write_atomic(path, lambda p: p.write_text(text, encoding="utf-8"))


def _json_safe(v: Any) -> Any:
    """Non-finite floats become None (JSON has no NaN); tuples become lists; numpy scalars plain numbers."""
    if getattr(v, "ndim", None) == 0 and hasattr(v, "item"):
        v = v.item()
    if isinstance(v, float) and not math.isfinite(v):
        return None
    if isinstance(v, dict):
        return {k: _json_safe(x) for k, x in v.items()}
    if isinstance(v, (list, tuple)):
        return [_json_safe(x) for x in v]
    return v


def write_json_atomic(path: str | os.PathLike[str], obj: Any, *, default: Callable | None = None) -> None:
    """``obj`` as indented, strict JSON (non-finite floats written as null), written atomically."""
    text = json.dumps(_json_safe(obj), indent=2, default=default, allow_nan=False) + "\n"
    write_text_atomic(path, text)


def save_pretrained_atomic(module: Any, target: str | os.PathLike[str], **kwargs: Any) -> None:
    """``module.save_pretrained`` into a sibling temporary folder, then swap it in place of ``target``."""
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=target.name + ".", suffix=".tmp", dir=target.parent))
    try:
        module.save_pretrained(tmp, **kwargs)
        os.chmod(tmp, umask_mode(directory=True))
        for f in tmp.iterdir():
            os.chmod(f, umask_mode())
        if target.exists():
            shutil.rmtree(target)
        os.replace(tmp, target)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp)


def refuse_overwrite(paths: Sequence[str | os.PathLike[str]], overwrite: bool) -> None:
    """SystemExit naming the files that exist, unless ``overwrite`` (checked before any work starts)."""
    existing = [str(p) for p in paths if Path(p).exists()]
    if existing and not overwrite:
        raise SystemExit(
            f"error: refusing to overwrite existing file(s): {', '.join(existing)} "
            "(pass --overwrite to replace them)"
        )
