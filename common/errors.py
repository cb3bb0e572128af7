"""One root exception for the project and a typed exception per boundary."""

from __future__ import annotations


class ImgSearchError(Exception):
    """Root of every error this project raises on purpose."""


class SettingsError(ImgSearchError):
    """A setting has a bad value; the message names it in one line."""


class ServiceUnavailable(ImgSearchError):
    """A backing service (Kafka, Milvus, Redis) cannot be reached; the message names it."""

    def __init__(self, service: str, address: str, detail: str = "") -> None:
        self.service = service
        self.address = address
        suffix = f": {detail}" if detail else ""
        super().__init__(f"{service} unavailable at {address}{suffix}")
