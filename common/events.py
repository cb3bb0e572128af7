"""The image-change event carried on the images topic (schema version 1).

Key: the normalised path (UTF-8). Value: this model as JSON for an upsert; no value
(a tombstone) for a delete, so log compaction keeps only the latest state of each file.
"""

from __future__ import annotations

import time
from typing import Literal

from pydantic import BaseModel, Field, ValidationError, field_validator

from common.errors import ImgSearchError

SCHEMA_VERSION = 1


class BadEvent(ImgSearchError):
    """A message on the topic that is not a valid event (reason code `bad_message`)."""

    reason = "bad_message"


class ImageEvent(BaseModel):
    schema_version: int = Field(SCHEMA_VERSION, alias="v")
    kind: Literal["upsert", "delete"]
    path: str = Field(min_length=1)
    size: int | None = Field(None, ge=0)
    mtime_ns: int | None = Field(None, ge=0)
    fingerprint: str | None = None
    emitted_at: float = Field(default_factory=time.time)

    model_config = {"populate_by_name": True, "frozen": True}

    @field_validator("path")
    @classmethod
    def _plain_absolute_path(cls, value: str) -> str:
        # The topic is not trusted input: a NUL byte makes every os.* call raise.
        if "\x00" in value:
            raise ValueError("path contains a NUL byte")
        if not value.startswith("/"):
            raise ValueError("path is not absolute")
        return value

    @property
    def key(self) -> bytes:
        return self.path.encode("utf-8", "surrogateescape")

    def encode(self) -> bytes | None:
        """The Kafka value: JSON for an upsert, None (a tombstone) for a delete."""
        if self.kind == "delete":
            return None
        return self.model_dump_json(by_alias=True).encode("utf-8")


def decode_event(key: bytes | None, value: bytes | None) -> ImageEvent:
    """Parse one Kafka record; raises BadEvent with a short detail for anything malformed."""
    if key is None:
        raise BadEvent("record has no key")
    try:
        path = key.decode("utf-8", "surrogateescape")
    except UnicodeDecodeError as error:
        raise BadEvent("key is not UTF-8") from error
    try:
        if value is None:
            return ImageEvent(kind="delete", path=path)
        event = ImageEvent.model_validate_json(value)
    except ValidationError as error:
        first = error.errors()[0]
        raise BadEvent(f"invalid event: {first['msg']} at {first['loc']}") from error
    if event.schema_version > SCHEMA_VERSION:
        raise BadEvent(f"unsupported schema version {event.schema_version}")
    if event.path != path:
        raise BadEvent("key and event path differ")
    return event
