"""`python -m stack install|up|down|status [SERVICE ...]`: the local service stack, no Docker."""

from __future__ import annotations

import argparse
import logging
import os
import shutil
import subprocess
import sys

from common.errors import ImgSearchError
from common.logs import configure_logging
from common.settings import load_settings
from stack import kafka_dist
from stack.services import services

log = logging.getLogger("stack")


def install(settings_version: str) -> None:
    """Fetch what `up` needs: Debian's redis-server when missing, and the Kafka jars."""
    if not shutil.which("redis-server"):
        if os.geteuid() != 0 or not shutil.which("apt-get"):
            raise ImgSearchError("redis-server not found: run `apt-get install redis-server`")
        log.info("installing Debian's redis-server")
        env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
        subprocess.run(["apt-get", "update", "-q"], check=True, env=env,
                       stdout=subprocess.DEVNULL)
        subprocess.run(["apt-get", "install", "-y", "-q", "--no-install-recommends",
                        "redis-server"], check=True, env=env, stdout=subprocess.DEVNULL)
    kafka_dist.java_binary()
    libs = kafka_dist.ensure_libs(settings_version)
    log.info("stack installed kafka_libs=%s redis=%s", libs, shutil.which("redis-server"))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m stack", description=__doc__)
    parser.add_argument("action", choices=["install", "up", "down", "status"])
    parser.add_argument("names", nargs="*", help="kafka, redis, milvus (default: all)")
    args = parser.parse_args(argv)
    configure_logging("INFO")
    # Readiness probes fail on purpose until a service answers; the client's errors for
    # those refused connections are noise here.
    logging.getLogger("kafka").setLevel(logging.CRITICAL)
    try:
        settings = load_settings()
        chosen = _select(services(settings), args.names)
        if args.action == "install":
            install(settings.stack.kafka_version)
            return 0
        return _run(args.action, chosen)
    except ImgSearchError as error:
        print(f"stack: {error}", file=sys.stderr)
        return 1


def _select(known: dict, names: list[str]) -> dict:
    unknown = sorted(set(names) - set(known))
    if unknown:
        raise ImgSearchError(f"unknown service {', '.join(unknown)}; know {', '.join(known)}")
    return {name: svc for name, svc in known.items() if not names or name in names}


def _run(action: str, chosen: dict) -> int:
    healthy = True
    order = reversed(list(chosen.items())) if action == "down" else chosen.items()
    for name, service in order:
        if action == "up":
            outcome = service.start()
        elif action == "down":
            outcome = service.stop()
        else:
            outcome = service.status()
            healthy = healthy and outcome.startswith("ready")
        print(f"{name:7s} {outcome}")
    return 0 if healthy else 1


if __name__ == "__main__":
    sys.exit(main())
