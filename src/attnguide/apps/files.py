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


def current_umask() -> int:
    """The process's umask, read without changing it where Linux reports it (``os.umask`` sets it, so
    reading it that way briefly changes it for every thread)."""
    try:
        with open("/proc/self/status", encoding="ascii") as f:
            for line in f:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except (OSError, ValueError, IndexError):
        pass
    umask = os.umask(0o022)
    os.umask(umask)
    return umask


def umask_mode(directory: bool = False) -> int:
    """The mode a plain ``open`` / ``mkdir`` would give (``mkstemp`` / ``mkdtemp`` use 0600 / 0700)."""
    return (0o777 if directory else 0o666) & ~current_umask()


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


def _chmod_tree(root: Path) -> None:
    """Folders and files under ``root`` (itself included) get the modes of a plain ``mkdir`` / ``open``."""
    dir_mode, file_mode = umask_mode(directory=True), umask_mode()
    os.chmod(root, dir_mode)
    for parent, dirs, files in os.walk(root):
        for d in dirs:
            os.chmod(os.path.join(parent, d), dir_mode)
        for f in files:
            os.chmod(os.path.join(parent, f), file_mode)


def save_pretrained_atomic(module: Any, target: str | os.PathLike[str], **kwargs: Any) -> None:
    """``module.save_pretrained`` into a sibling temporary folder, then swap it in place of ``target``."""
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=target.name + ".", suffix=".tmp", dir=target.parent))
    try:
        module.save_pretrained(tmp, **kwargs)
        _chmod_tree(tmp)
        if target.exists():
            shutil.rmtree(target)
        os.replace(tmp, target)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp)


def check_output_folder(folder: str | os.PathLike[str], flag: str = "--out") -> None:
    """SystemExit naming ``flag`` unless ``folder`` is a folder this process can create files in, or can be
    created as one (checked before any work starts; nothing is left behind)."""
    folder = Path(folder)
    existing = folder
    while not (existing.exists() or existing.is_symlink()) and existing != existing.parent:
        existing = existing.parent
    if not existing.is_dir():
        what = "is a file" if existing.exists() else "is a broken link"
        if existing == folder:
            raise SystemExit(f"error: {flag}: {str(folder)!r} {what}, not a folder")
        raise SystemExit(f"error: {flag}: {str(folder)!r} cannot be a folder: {str(existing)!r} {what}")
    try:
        os.rmdir(tempfile.mkdtemp(prefix=".attnguide-probe.", dir=existing))
    except OSError as err:
        raise SystemExit(
            f"error: {flag}: {str(folder)!r}: cannot create files in {str(existing)!r} ({err.strerror})"
        ) from None


def refuse_overwrite(paths: Sequence[str | os.PathLike[str]], overwrite: bool, flag: str = "--out") -> None:
    """SystemExit naming the files that exist, unless ``overwrite``, and naming any that is a folder
    (checked before any work starts)."""
    folders = [str(p) for p in paths if Path(p).is_dir()]
    if folders:
        raise SystemExit(f"error: {flag}: {', '.join(folders)} must be file(s), not folder(s)")
    existing = [str(p) for p in paths if Path(p).exists()]
    if existing and not overwrite:
        raise SystemExit(
            f"error: {flag}: refusing to overwrite existing file(s): {', '.join(existing)} "
            "(pass --overwrite to replace them)"
        )


def remove_files(paths: Sequence[str | os.PathLike[str]]) -> list[Path]:
    """Remove those of ``paths`` that exist as files (or links); returns the ones removed."""
    removed = []
    for p in map(Path, paths):
        if p.is_file() or p.is_symlink():
            p.unlink()
            removed.append(p)
    return removed
