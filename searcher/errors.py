"""The searcher's typed errors; each message is one line a person can act on."""

from __future__ import annotations

from common.errors import ImgSearchError


class QueryError(ImgSearchError):
    """The query image cannot be read; `reason` is the images module's reason code."""

    def __init__(self, query: str, reason: str, detail: str) -> None:
        self.query = query
        self.reason = reason
        self.detail = detail
        super().__init__(f"query {query}: {reason}: {detail}")


class ModelNotIndexed(ImgSearchError):
    """The model is known but no worker has built its collection yet."""


class NoIndexedModels(ImgSearchError):
    """No enabled model has an index, so there is nothing to search."""
