"""``python -m attnguide.apps.train``: the same as ``attnguide train``."""

from .cli import main

if __name__ == "__main__":
    raise SystemExit(main())
