"""``python -m attnguide.apps.eval`` (and ``torchrun ... -m attnguide.apps.eval``): ``attnguide eval``."""

from .cli import main

raise SystemExit(main())
