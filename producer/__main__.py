"""`python -m producer`: watch the configured roots until SIGINT/SIGTERM, then flush."""

from __future__ import annotations

import argparse
import logging
import signal
import sys
import threading
from types import FrameType

from common.errors import SettingsError
from common.logs import configure_logging
from common.settings import load_settings, log_effective
from producer.service import Producer

log = logging.getLogger("producer")


def _parse(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m producer",
        description="Watch folders and publish image changes to Kafka "
                    "(settings: IMGSEARCH_* environment variables).",
    )
    parser.add_argument("--once", action="store_true",
                        help="reconcile the roots with the ledger, publish, and exit")
    return parser.parse_args(argv)


def _install_signals(stop: threading.Event) -> None:
    def handle(signum: int, _frame: FrameType | None) -> None:
        name = signal.Signals(signum).name
        if stop.is_set():
            log.info("signal received again signal=%s, still flushing (bounded by "
                     "IMGSEARCH_WATCH__SHUTDOWN_FLUSH_TIMEOUT_S)", name)
            return
        log.info("signal received signal=%s, stopping", name)
        stop.set()

    signal.signal(signal.SIGINT, handle)
    signal.signal(signal.SIGTERM, handle)


def _ignore_signals() -> None:
    """After a clean stop, a late signal must not turn exit 0 into death by signal.

    Interpreter shutdown puts Python-level handlers back to the default (terminate)."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)


def _run(producer: Producer, stop: threading.Event, once: bool) -> None:
    """Wait for a signal, the end of a --once pass, or a failed producer thread."""
    while not stop.is_set() and producer.failure() is None:
        if once and producer.idle():
            return
        stop.wait(0.2)


def main(argv: list[str] | None = None) -> int:
    args = _parse(argv)
    try:
        settings = load_settings()
    except SettingsError as error:
        print(f"producer: {error}", file=sys.stderr)
        return 2
    if not settings.watch.roots:
        print("producer: invalid setting IMGSEARCH_WATCH__ROOTS: no roots, nothing to watch",
              file=sys.stderr)
        return 2
    configure_logging(settings.log_level)
    log_effective(settings, "producer")

    stop = threading.Event()
    _install_signals(stop)
    producer = Producer(settings)
    producer.start()
    _run(producer, stop, args.once)
    producer.stop()
    _ignore_signals()
    failure = producer.failure()
    if failure is not None:
        log.error("producer exits after a failed thread error=%s", failure)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
