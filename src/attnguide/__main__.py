"""``python -m attnguide``: the ``attnguide`` command (see :mod:`attnguide.apps.cli`)."""

from .apps.cli import main

raise SystemExit(main())
