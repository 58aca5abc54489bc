"""Two lines Lightning prints on every command that a ``pyra-lightning`` user can do nothing about.

- The ``litlogger`` advertisement, logged at INFO by every Trainer built without a LitLogger.
- ``isinstance(treespec, LeafSpec)`` is deprecated: torch warns about Lightning's own
  ``utilities/_pytree.py`` on every evaluation loop.

Both are dropped for the command's duration only (``quiet_lightning_notices``), matched by their
exact text; every other Lightning line and warning still shows.
"""

from __future__ import annotations

import logging
import warnings
from collections.abc import Iterator
from contextlib import contextmanager

ADVERT = "💡 Tip: For seamless cloud logging"
LEAFSPEC = r"`isinstance\(treespec, LeafSpec\)` is deprecated"
RANK_ZERO_LOGGER = "lightning.pytorch.utilities.rank_zero"  # where rank_zero_info logs


class _DropAdvert(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        return not str(record.msg).startswith(ADVERT)


@contextmanager
def quiet_lightning_notices() -> Iterator[None]:
    """Inside, neither notice is shown; outside, Lightning's logging and warnings are as before."""
    logger, advert = logging.getLogger(RANK_ZERO_LOGGER), _DropAdvert()
    logger.addFilter(advert)
    try:
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message=LEAFSPEC)
            yield
    finally:
        logger.removeFilter(advert)
