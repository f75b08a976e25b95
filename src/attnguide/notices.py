"""Notices of the libraries attnguide uses that reach the user's terminal without being asked for and say
nothing the user can act on here: transformers' "requires torchvision (not installed); falling back to
the PIL image processor" (torchvision is not needed, and on CPU builds of torch it cannot be installed
beside it). One logging filter on the logger that emits it drops exactly that message; every other
message passes. Importing this module installs the filters (the pipelines and the command import it
first)."""

from __future__ import annotations

import logging

__all__ = ["quiet_notices"]

#: (logger name, a phrase only the dropped message has)
_DROPPED = (("transformers.utils.import_utils", "requires torchvision (not installed); falling back to"),)


class _DropNotice(logging.Filter):
    def __init__(self, phrase: str):
        super().__init__()
        self.phrase = phrase

    def filter(self, record: logging.LogRecord) -> bool:
        return self.phrase not in record.getMessage()


def quiet_notices() -> None:
    """Install the filters (once; later calls do nothing)."""
    for name, phrase in _DROPPED:
        logger = logging.getLogger(name)
        if not any(isinstance(f, _DropNotice) and f.phrase == phrase for f in logger.filters):
            logger.addFilter(_DropNotice(phrase))


quiet_notices()
