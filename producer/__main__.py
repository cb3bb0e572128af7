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
        log.info("signal received signal=%s, stopping", signal.Signals(signum).name)
        stop.set()

    signal.signal(signal.SIGINT, handle)
    signal.signal(signal.SIGTERM, handle)


def main(argv: list[str] | None = None) -> int:
    args = _parse(argv)
    try:
        settings = load_settings()
    except SettingsError as error:
        print(f"producer: {error}", file=sys.stderr)
        return 2
    configure_logging(settings.log_level)
    log_effective(settings, "producer")

    stop = threading.Event()
    _install_signals(stop)
    producer = Producer(settings)
    producer.start()
    if args.once:
        while not stop.is_set() and not producer.idle():
            stop.wait(0.2)
    else:
        stop.wait()
    producer.stop()
    return 0


if __name__ == "__main__":
    sys.exit(main())
