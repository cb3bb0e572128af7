"""`python -m worker --model NAME` runs a worker; `status` and `rebuild-mapping` operate it.

Exit codes: 0 done, 1 unhealthy (status) or fatal error, 2 bad usage or settings,
3 a service stayed unavailable.
"""

from __future__ import annotations

import argparse
import logging
import signal
import sys
import threading
import time
from types import FrameType

from common.errors import ImgSearchError, ServiceUnavailable, SettingsError
from common.logs import configure_logging
from common.mapping import IndexedFile, PathIndex, connect_redis
from common.registry import UnknownModel, load_registry
from common.settings import Settings, load_settings, log_effective

log = logging.getLogger("worker")

COMMANDS = ("status", "rebuild-mapping")
START_MAX_BACKOFF_S = 30.0


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m worker",
        description="Index images for one model: consume the images topic, embed, store.",
        epilog="Also: `python -m worker status [--model NAME ...]` and "
               "`python -m worker rebuild-mapping --model NAME`.",
    )
    parser.add_argument("--model", required=True, help="model name from the registry")
    return parser


def _command_parser(command: str) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog=f"python -m worker {command}")
    if command == "status":
        parser.add_argument("--model", action="append", dest="models",
                            help="model to report (repeatable); default: enabled models")
    else:
        parser.add_argument("--model", required=True, help="model name from the registry")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = list(sys.argv[1:] if argv is None else argv)
    try:
        settings = load_settings()
    except SettingsError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    configure_logging(settings.log_level)

    if args and args[0] in COMMANDS:
        options = _command_parser(args[0]).parse_args(args[1:])
        try:
            if args[0] == "status":
                known = load_registry(settings.models.registry_file)
                unknown = sorted(set(options.models or []) - set(known))
                if unknown:  # an unknown name is an error, not a model that is down
                    raise UnknownModel(f"unknown model {', '.join(unknown)}; the registry "
                                       f"has {', '.join(sorted(known))}")
                return status(settings, options.models or settings.models.enabled)
            return rebuild_mapping(settings, options.model)
        except ServiceUnavailable as error:
            print(f"error: {error}", file=sys.stderr)
            return 3
        except ImgSearchError as error:
            print(f"error: {error}", file=sys.stderr)
            return 1
    options = _parser().parse_args(args)
    return run(settings, options.model)


def run(settings: Settings, model: str) -> int:
    """Run one worker until SIGTERM/SIGINT; the batch in hand is finished or left uncommitted."""
    from worker.runner import Worker

    log_effective(settings, f"worker:{model}")
    stop = threading.Event()
    _install_signal_handlers(stop)
    try:
        worker = _start(settings, model, stop, Worker)
    except ImgSearchError as error:
        log.error("worker cannot start model=%s error=%s", model, error)
        return 2 if not isinstance(error, ServiceUnavailable) else 3
    if worker is None:
        return 0
    try:
        worker.run(stop)
    finally:
        worker.close()
    return 0


def _start(settings: Settings, model: str, stop: threading.Event, factory: type):
    """Build the worker, waiting out services that are down at start (capped backoff)."""
    backoff_s = 1.0
    while True:
        try:
            return factory(settings, model)
        except ServiceUnavailable as error:
            log.warning("waiting for service model=%s service=%s error=%s retry_in_s=%.0f",
                        model, error.service, error, backoff_s)
        if stop.wait(backoff_s):
            return None
        backoff_s = min(backoff_s * 2, START_MAX_BACKOFF_S)


def _install_signal_handlers(stop: threading.Event) -> None:
    def request_stop(signum: int, _frame: FrameType | None) -> None:
        log.info("stop requested signal=%s", signal.Signals(signum).name)
        stop.set()

    signal.signal(signal.SIGTERM, request_stop)
    signal.signal(signal.SIGINT, request_stop)


def status(settings: Settings, models: list[str]) -> int:
    """Print each model's health; non-zero when any model has no live worker."""
    from worker.health import model_status

    client = connect_redis(settings.redis)
    healthy = True
    try:
        for model in models:
            index = PathIndex(client, settings.redis.key_prefix, model)
            report = model_status(settings, index, model)
            print("\n".join(report.lines()))
            healthy = healthy and report.healthy
    finally:
        client.close()
    return 0 if healthy else 1


def rebuild_mapping(settings: Settings, model: str) -> int:
    """Recreate the Redis mapping of one model from the rows of its Milvus collection."""
    from common.registry import resolve_model
    from common.store import VectorStore

    spec = resolve_model(model, settings)
    store = VectorStore(settings.milvus)
    client = connect_redis(settings.redis)
    started = time.monotonic()
    try:
        if not store.has_index(spec):
            print(f"error: no collection {store.collection_name(spec)} for model {model} "
                  f"version {spec.version}", file=sys.stderr)
            return 1
        index = PathIndex(client, settings.redis.key_prefix, model)
        live = index.heartbeats()
        if live:
            log.warning("workers are running during rebuild model=%s workers=%s",
                        model, ",".join(live))
        files = (
            [IndexedFile(path=row.path, id=row.id, fingerprint=row.fingerprint,
                         size=None, mtime_ns=row.mtime_ns) for row in rows]
            for rows in store.iter_rows(spec)
        )
        total = index.replace_all(files, spec.version)
    finally:
        store.close()
        client.close()
    log.info("mapping rebuilt model=%s files=%d duration_s=%.1f",
             model, total, time.monotonic() - started)
    print(f"rebuilt mapping for {model}: {total} files")
    return 0


if __name__ == "__main__":
    sys.exit(main())
