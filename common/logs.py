"""Logging set-up for entry points; library modules only call logging.getLogger(__name__)."""

from __future__ import annotations

import logging
import sys

LOG_FORMAT = "%(asctime)s %(levelname)s %(name)s %(message)s"


def configure_logging(level: str = "INFO") -> None:
    """Send log lines to stderr so stdout stays for results (e.g. `searcher --json`)."""
    logging.basicConfig(level=level, format=LOG_FORMAT, stream=sys.stderr, force=True)
    quiet = max(logging.WARNING, logging.getLevelName(level))
    for noisy in ("kafka", "urllib3", "watchdog"):
        logging.getLogger(noisy).setLevel(quiet)
    # pymilvus logs an ERROR with a traceback on every retried call; our own code logs an
    # outage once when it starts and once when it ends, so the client's lines are noise.
    logging.getLogger("pymilvus").setLevel(
        logging.DEBUG if level == "DEBUG" else logging.CRITICAL)
