"""Notices of the libraries attnguide uses that reach the user's terminal without being asked for and say
nothing the user needs here: transformers' "requires torchvision (not installed); falling back to the PIL
image processor" (torchvision is not needed, and on CPU builds of torch it cannot be installed beside
it), and diffusers' advice to install accelerate at every model load (loading works the same without).
One logging filter on each logger that emits one drops exactly that message; every other message
passes. Importing this module installs the filters (the pipelines and the command import it first)."""

from __future__ import annotations

import logging

__all__ = ["quiet_notices"]

#: (logger name, a phrase only the dropped message has)
_DROPPED = (
    ("transformers.utils.import_utils", "requires torchvision (not installed); falling back to"),
    # diffusers' advice to install accelerate, printed at every load of a model without it; loading works
    # the same (low_cpu_mem_usage=False is what it falls back to)
    ("diffusers.pipelines.pipeline_utils", "because `accelerate` was not found"),
    ("diffusers.models.modeling_utils", "because `accelerate` was not found"),
)


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
