"""Settings for every process, read from IMGSEARCH_* environment variables and `.env`.

Nested groups use `__`: `IMGSEARCH_KAFKA__BOOTSTRAP_SERVERS=127.0.0.1:9092`.
Defaults point at the local stack on loopback (`python -m stack up`).
"""

from __future__ import annotations

import json
import logging
import re
from pathlib import Path
from urllib.parse import urlsplit
from typing import Any, Literal

from pydantic import BaseModel, Field, SecretStr, ValidationError, field_validator
from pydantic_settings import BaseSettings, SettingsConfigDict, SettingsError as SourceError

from common.errors import SettingsError

log = logging.getLogger(__name__)

PROJECT_ROOT = Path(__file__).resolve().parent.parent
DEFAULT_REGISTRY = Path(__file__).resolve().parent / "models.toml"
DEFAULT_EXTENSIONS = (
    ".jpg", ".jpeg", ".png", ".webp", ".gif", ".bmp", ".tif", ".tiff",
)
# Kafka's own rule for topic names (a bad one is otherwise retried forever at create time).
TOPIC_NAME = re.compile(r"[a-zA-Z0-9._-]{1,249}")


class KafkaSettings(BaseModel):
    bootstrap_servers: str = "127.0.0.1:9092"
    images_topic: str = "imgsearch.images"
    dead_letter_topic: str = "imgsearch.deadletter"
    partitions: int = Field(12, ge=1, le=10_000)
    replication_factor: int = Field(1, ge=1)
    group_prefix: str = "imgsearch-worker"
    client_id: str = "imgsearch"
    request_timeout_ms: int = Field(30_000, ge=1_000)
    security_protocol: Literal["PLAINTEXT", "SSL", "SASL_PLAINTEXT", "SASL_SSL"] = "PLAINTEXT"
    sasl_mechanism: str | None = None
    sasl_username: str | None = None
    sasl_password: SecretStr | None = None
    ssl_cafile: str | None = None
    ssl_certfile: str | None = None
    ssl_keyfile: str | None = None

    def client_options(self) -> dict[str, Any]:
        """Connection options shared by kafka-python producers, consumers and admin clients."""
        options: dict[str, Any] = {
            "bootstrap_servers": self.bootstrap_servers.split(","),
            "client_id": self.client_id,
            "request_timeout_ms": self.request_timeout_ms,
            "security_protocol": self.security_protocol,
        }
        optional = {
            "sasl_mechanism": self.sasl_mechanism,
            "sasl_plain_username": self.sasl_username,
            "sasl_plain_password": (
                self.sasl_password.get_secret_value() if self.sasl_password else None
            ),
            "ssl_cafile": self.ssl_cafile,
            "ssl_certfile": self.ssl_certfile,
            "ssl_keyfile": self.ssl_keyfile,
        }
        options.update({key: value for key, value in optional.items() if value is not None})
        return options

    @field_validator("bootstrap_servers")
    @classmethod
    def _check_servers(cls, value: str) -> str:
        """Each entry host:port with a numeric port; kafka-python would raise in a thread."""
        for entry in value.split(","):
            host, _, port = entry.strip().rpartition(":")
            if not host or not port.isdigit() or not 1 <= int(port) <= 65535:
                raise ValueError(f"entry {entry!r} is not host:port with a port 1..65535")
        return value

    @field_validator("images_topic", "dead_letter_topic")
    @classmethod
    def _check_topic(cls, value: str) -> str:
        if not TOPIC_NAME.fullmatch(value) or value in {".", ".."}:
            raise ValueError("a topic name is 1..249 characters of a-z A-Z 0-9 . _ -")
        return value


class MilvusSettings(BaseModel):
    uri: str = "http://127.0.0.1:19530"
    token: SecretStr | None = None
    db_name: str = "default"
    collection_prefix: str = "imgsearch"
    timeout_s: float = Field(10.0, gt=0)


class RedisSettings(BaseModel):
    url: str = "redis://127.0.0.1:6379/0"
    password: SecretStr | None = None
    key_prefix: str = "imgsearch"
    socket_timeout_s: float = Field(5.0, gt=0)

    @field_validator("url")
    @classmethod
    def _check_scheme(cls, value: str) -> str:
        if not value.startswith(("redis://", "rediss://", "unix://")):
            raise ValueError("must start with redis://, rediss:// or unix://")
        return value

    @field_validator("url")
    @classmethod
    def _check_port(cls, value: str) -> str:
        """A bad port fails here in one line instead of deep inside redis-py."""
        if value.startswith("unix://"):
            return value
        try:
            urlsplit(value).port
        except ValueError as error:
            raise ValueError(f"bad port: {error}") from error
        return value


class WatchSettings(BaseModel):
    roots: list[Path] = Field(default_factory=lambda: [PROJECT_ROOT / "var" / "images"])
    extensions: list[str] = Field(default_factory=lambda: list(DEFAULT_EXTENSIONS))
    settle_s: float = Field(0.5, ge=0, le=60)
    polling: bool = False
    poll_interval_s: float = Field(1.0, gt=0)
    reconcile_interval_s: float = Field(300.0, ge=0)
    publish_batch_size: int = Field(500, ge=1, le=100_000)
    retry_max_backoff_s: float = Field(10.0, gt=0)
    shutdown_flush_timeout_s: float = Field(15.0, ge=0)
    progress_interval_s: float = Field(5.0, gt=0)
    # An empty root may be an unmounted disk: its published files are kept unless false.
    empty_root_is_unmounted: bool = True

    @field_validator("extensions")
    @classmethod
    def _normalise_extensions(cls, value: list[str]) -> list[str]:
        return [ext.lower() if ext.startswith(".") else f".{ext.lower()}" for ext in value]


class ModelsSettings(BaseModel):
    registry_file: Path = DEFAULT_REGISTRY
    enabled: list[str] = Field(default_factory=lambda: ["efficientnet-lite0", "resnet50-nsfw"])
    search_dirs: list[Path] = Field(
        default_factory=lambda: [PROJECT_ROOT.parent / "shared" / "models"]
    )
    cache_dir: Path = Path.home() / ".cache" / "imgsearch" / "models"
    intra_op_threads: int = Field(0, ge=0, le=256)
    max_batch: int = Field(32, ge=1, le=1024)
    fetch_timeout_s: float = Field(60.0, gt=0)
    # `models fetch`: fetch_timeout_s bounds each read; these bound the whole download.
    fetch_deadline_s: float = Field(3600.0, gt=0)
    max_download_bytes: int = Field(2 * 1024**3, ge=1)


class ImageSettings(BaseModel):
    max_pixels: int = Field(64_000_000, ge=1)


class WorkerSettings(BaseModel):
    batch_size: int = Field(32, ge=1, le=1024)
    poll_timeout_ms: int = Field(500, ge=1)
    decode_threads: int = Field(2, ge=1, le=64)
    max_poll_interval_ms: int = Field(300_000, ge=10_000)
    retry_max_backoff_s: float = Field(10.0, gt=0)
    heartbeat_ttl_s: int = Field(60, ge=5)
    # How long a deleted file's vector is kept for reuse by a rename's later upsert.
    orphan_vector_ttl_s: int = Field(3600, ge=0)
    # A worker killed without leaving the group holds its partitions this long.
    session_timeout_ms: int = Field(45_000, ge=6_000)


class StackSettings(BaseModel):
    state_dir: Path = PROJECT_ROOT / "var" / "stack"
    kafka_version: str = "4.4.0"
    kafka_controller_port: int = Field(9093, ge=1, le=65535)
    kafka_heap: str = "512m"
    ready_timeout_s: float = Field(90.0, gt=0)


class Settings(BaseSettings):
    """Every setting of every process; one instance per process."""

    model_config = SettingsConfigDict(
        env_prefix="IMGSEARCH_",
        env_nested_delimiter="__",
        env_file=".env",
        env_file_encoding="utf-8",
        extra="ignore",
    )

    log_level: Literal["DEBUG", "INFO", "WARNING", "ERROR"] = "INFO"
    kafka: KafkaSettings = Field(default_factory=KafkaSettings)
    milvus: MilvusSettings = Field(default_factory=MilvusSettings)
    redis: RedisSettings = Field(default_factory=RedisSettings)
    watch: WatchSettings = Field(default_factory=WatchSettings)
    models: ModelsSettings = Field(default_factory=ModelsSettings)
    images: ImageSettings = Field(default_factory=ImageSettings)
    worker: WorkerSettings = Field(default_factory=WorkerSettings)
    stack: StackSettings = Field(default_factory=StackSettings)

    def redacted(self) -> dict[str, Any]:
        """The effective settings as plain data, secrets shown as '**********'.

        Passwords written inside a URL (redis://:secret@host) are hidden too.
        """
        dumped = json.loads(self.model_dump_json())
        for group, key in (("redis", "url"), ("milvus", "uri"), ("kafka", "bootstrap_servers")):
            dumped[group][key] = _URL_PASSWORD.sub(r"\1**********@", dumped[group][key])
        return dumped


def _describe(error: ValidationError) -> str:
    first = error.errors()[0]
    name = "IMGSEARCH_" + "__".join(str(part).upper() for part in first["loc"])
    value = first.get("input")
    shown = "" if isinstance(value, dict) else f" (got {value!r})"
    return f"invalid setting {name}{shown}: {first['msg']}"


_URL_PASSWORD = re.compile(r"(://[^:/@]*:)[^@/]*@")
_SOURCE_FIELD = re.compile(r'error parsing value for field "([^"]+)"')


def _describe_source_error(error: SourceError) -> str:
    """pydantic-settings names only the group; say which variables and what they must be."""
    match = _SOURCE_FIELD.search(str(error))
    cause = f": {error.__cause__}" if error.__cause__ else ""
    if not match:
        return f"invalid setting: {error}{cause}"
    group = match.group(1).upper()
    return (f"invalid setting IMGSEARCH_{group}__*: a list or nested value must be JSON, "
            f"e.g. IMGSEARCH_WATCH__ROOTS='[\"/photos\"]'{cause}")


def load_settings(**overrides: Any) -> Settings:
    """Build the settings, turning any bad value into one SettingsError naming the setting."""
    try:
        return Settings(**overrides)
    except ValidationError as error:
        raise SettingsError(_describe(error)) from error
    except SourceError as error:
        raise SettingsError(_describe_source_error(error)) from error


def log_effective(settings: Settings, process: str) -> None:
    """Log the effective settings once at start, secrets hidden."""
    log.info("settings process=%s %s", process, json.dumps(settings.redacted(), default=str))
