"""Logging set-up for entry points; library modules only call logging.getLogger(__name__)."""

from __future__ import annotations

import logging
import sys

LOG_FORMAT = "%(asctime)s %(levelname)s %(name)s %(message)s"


def configure_logging(level: str = "INFO") -> None:
    """Send log lines to stderr so stdout stays for results (e.g. `searcher --json`)."""
    logging.basicConfig(level=level, format=LOG_FORMAT, stream=sys.stderr, force=True)
    for noisy in ("kafka", "pymilvus", "urllib3", "watchdog"):
        logging.getLogger(noisy).setLevel(max(logging.WARNING, logging.getLevelName(level)))
