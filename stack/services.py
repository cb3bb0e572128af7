"""The three local services, each run as a plain process bound to 127.0.0.1.

Every service keeps its data, log and pid file under one state folder
(`IMGSEARCH_STACK__STATE_DIR`), so `up` after `down` finds its data again.
Ports come from the client settings, so the stack and the clients never disagree.
"""

from __future__ import annotations

import logging
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import urlparse

from common.errors import ImgSearchError
from common.settings import Settings
from stack import kafka_dist

log = logging.getLogger(__name__)

HOST = "127.0.0.1"
TEMPLATES = Path(__file__).resolve().parent


class StackError(ImgSearchError):
    """A service could not be installed, started or stopped; the message says why."""


@dataclass
class Service:
    """One managed process: how to start it, where it listens, how to tell it is ready."""

    name: str
    port: int
    settings: Settings
    ready_timeout_s: float = 90.0
    stop_timeout_s: float = 30.0
    home: Path = field(init=False)

    def __post_init__(self) -> None:
        self.home = self.settings.stack.state_dir / self.name

    @property
    def pid_file(self) -> Path:
        return self.home / f"{self.name}.pid"

    @property
    def log_file(self) -> Path:
        return self.home / f"{self.name}.log"

    def command(self) -> list[str]:
        raise NotImplementedError

    def prepare(self) -> None:
        """Write config files and initialise storage before the first start."""

    def probe(self) -> None:
        """Raise if the service does not answer a real request."""
        raise NotImplementedError

    def pid(self) -> int | None:
        """The pid of our running process, or None (a stale pid file is removed)."""
        try:
            pid = int(self.pid_file.read_text().strip())
        except (FileNotFoundError, ValueError):
            return None
        if _alive(pid):
            return pid
        self.pid_file.unlink(missing_ok=True)
        return None

    def is_ready(self) -> bool:
        try:
            self.probe()
        except Exception:  # noqa: BLE001 - any failure of the probe means "not ready"
            return False
        return True

    def start(self) -> str:
        """Start the service unless it already runs; wait until it answers."""
        if self.pid() is not None:
            self.wait_ready()
            return "already running"
        if _port_in_use(self.port):
            if self.is_ready():
                return f"already answering on {HOST}:{self.port} (started elsewhere; left alone)"
            raise StackError(
                f"{self.name}: port {self.port} in use by another process "
                f"(stop it, or point the {self.name} settings at another port)"
            )
        self.home.mkdir(parents=True, exist_ok=True)
        self.prepare()
        started = time.monotonic()
        self._spawn()
        self.wait_ready()
        return f"started in {time.monotonic() - started:.1f}s"

    def _spawn(self) -> None:
        with open(self.log_file, "ab") as log_handle:
            process = subprocess.Popen(  # noqa: S603 - fixed argv built above
                self.command(),
                stdout=log_handle,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                cwd=self.home,
                env=self.environment(),
                start_new_session=True,
            )
        self.pid_file.write_text(str(process.pid))

    def environment(self) -> dict[str, str]:
        return dict(os.environ)

    def wait_ready(self) -> None:
        deadline = time.monotonic() + self.ready_timeout_s
        while time.monotonic() < deadline:
            if self.is_ready():
                return
            if self.pid() is None:
                raise StackError(f"{self.name} exited during start-up; see {self.log_file}")
            time.sleep(0.3)
        raise StackError(
            f"{self.name} not ready on {HOST}:{self.port} after {self.ready_timeout_s:.0f}s; "
            f"see {self.log_file}"
        )

    def stop(self) -> str:
        pid = self.pid()
        if pid is None:
            return "not started here" if _port_in_use(self.port) else "not running"
        os.killpg(pid, signal.SIGTERM)
        deadline = time.monotonic() + self.stop_timeout_s
        while time.monotonic() < deadline and _alive(pid):
            time.sleep(0.2)
        if _alive(pid):
            os.killpg(pid, signal.SIGKILL)
            _wait_gone(pid)
        self.pid_file.unlink(missing_ok=True)
        return "stopped"

    def status(self) -> str:
        pid = self.pid()
        if pid is None:
            if not _port_in_use(self.port):
                return "stopped"
            if self.is_ready():
                return f"ready (started elsewhere) {HOST}:{self.port}"
            return "port in use by another process"
        state = "ready" if self.is_ready() else "not answering"
        return f"{state} pid={pid} {HOST}:{self.port}"


class Redis(Service):
    """Debian's redis-server with AOF on and no eviction: the mapping is data, not cache."""

    def binary(self) -> str:
        found = shutil.which("redis-server")
        if not found:
            raise StackError(
                "redis-server not found: run `python -m stack install` "
                "(installs Debian's redis-server) or `apt-get install redis-server`"
            )
        return found

    def prepare(self) -> None:
        (self.home / "data").mkdir(exist_ok=True)
        template = (TEMPLATES / "redis.conf").read_text()
        config = template.format(host=HOST, port=self.port, data_dir=self.home / "data")
        (self.home / "redis.conf").write_text(config)

    def command(self) -> list[str]:
        return [self.binary(), str(self.home / "redis.conf")]

    def probe(self) -> None:
        import redis

        client = redis.Redis(host=HOST, port=self.port, socket_timeout=1)
        try:
            if client.ping() is not True:
                raise StackError("redis did not answer PING")
            if client.info("persistence").get("loading"):
                raise StackError("redis still loading its AOF")
        finally:
            client.close()


class Milvus(Service):
    """Milvus Lite in gRPC server mode: one process owns the data folder, all clients share it."""

    def binary(self) -> str:
        beside_python = Path(sys.executable).parent / "milvus-lite"
        if beside_python.exists():
            return str(beside_python)
        found = shutil.which("milvus-lite")
        if not found:
            raise StackError("milvus-lite not found: `pip install -e .` installs it")
        return found

    def command(self) -> list[str]:
        return [
            self.binary(), "server", "--data-dir", str(self.home / "data"),
            "--host", HOST, "--port", str(self.port),
        ]

    def probe(self) -> None:
        from pymilvus import MilvusClient

        client = MilvusClient(uri=f"http://{HOST}:{self.port}", timeout=2)
        try:
            client.list_collections()
        finally:
            client.close()


class Kafka(Service):
    """Apache Kafka in KRaft mode (combined broker and controller) from the Maven Central jars."""

    def __post_init__(self) -> None:
        super().__post_init__()
        self.controller_port = self.settings.stack.kafka_controller_port

    def prepare(self) -> None:
        java = kafka_dist.java_binary()
        libs = kafka_dist.ensure_libs(self.settings.stack.kafka_version)
        data_dir = self.home / "data"
        template = (TEMPLATES / "kafka.properties").read_text()
        properties = template.format(
            host=HOST, port=self.port, controller_port=self.controller_port, data_dir=data_dir
        )
        (self.home / "server.properties").write_text(properties)
        if not (data_dir / "meta.properties").exists():
            kafka_dist.format_storage(java, libs, self.home / "server.properties")

    def command(self) -> list[str]:
        libs = kafka_dist.ensure_libs(self.settings.stack.kafka_version)
        return [
            kafka_dist.java_binary(),
            f"-Xmx{self.settings.stack.kafka_heap}",
            f"-Xms{self.settings.stack.kafka_heap}",
            "-XX:+UseG1GC",
            f"-Dlog4j2.configurationFile={TEMPLATES / 'log4j2.yaml'}",
            f"-Dkafka.logs.dir={self.home}",
            "-cp", f"{libs}/*",
            "kafka.Kafka", str(self.home / "server.properties"),
        ]

    def start(self) -> str:
        if self.pid() is None and not _port_in_use(self.port) and _port_in_use(
            self.controller_port
        ):
            raise StackError(
                f"kafka: controller port {self.controller_port} in use by another process "
                f"(stop it, or set IMGSEARCH_STACK__KAFKA_CONTROLLER_PORT to a free port)"
            )
        return super().start()

    def probe(self) -> None:
        from kafka import KafkaAdminClient

        admin = KafkaAdminClient(
            bootstrap_servers=f"{HOST}:{self.port}", request_timeout_ms=3000
        )
        try:
            admin.describe_cluster()
        finally:
            admin.close()


def services(settings: Settings) -> dict[str, Service]:
    """The stack in start order: Kafka is slowest, so it is started first."""
    timeout = settings.stack.ready_timeout_s
    return {
        "kafka": Kafka("kafka", _port_of(settings.kafka.bootstrap_servers, 9092),
                       settings, ready_timeout_s=timeout),
        "redis": Redis("redis", _port_of(settings.redis.url, 6379), settings,
                       ready_timeout_s=timeout),
        "milvus": Milvus("milvus", _port_of(settings.milvus.uri, 19530), settings,
                         ready_timeout_s=timeout),
    }


def _port_of(address: str, default: int) -> int:
    first = address.split(",")[0]
    parsed = urlparse(first if "://" in first else f"tcp://{first}")
    return parsed.port or default


def _port_in_use(port: int) -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.settimeout(0.5)
        return sock.connect_ex((HOST, port)) == 0


def _alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text()
    except FileNotFoundError:
        return False
    return re.search(r"\) ([A-Z]) ", state).group(1) != "Z"  # a zombie has exited


def _wait_gone(pid: int, timeout_s: float = 10.0) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline and _alive(pid):
        time.sleep(0.1)
