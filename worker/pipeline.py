"""One batch of events through one model: classify, reuse or embed, write Milvus and Redis.

`Batch.prepare` runs once per polled batch (pure, no services); `Pipeline.apply` may run
several times for the same batch when a service is down, so every write is idempotent
(ids are derived from paths) and vectors computed by an earlier attempt are kept.
"""

from __future__ import annotations

import logging
import os
import stat
from collections import Counter
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
from numpy.typing import NDArray

from common.events import BadEvent, ImageEvent, decode_event
from common.ids import file_fingerprint, is_under, normalise_path, path_id
from common.mapping import IndexedFile, MappingChanges, PathIndex
from common.store import VectorRow, VectorStore, path_fits
from worker.deadletter import DeadLetter, DeadLetterWriter, SourceRecord

if TYPE_CHECKING:
    from common.embedder import Embedder
    from common.registry import ModelSpec

log = logging.getLogger(__name__)

Vector = NDArray[np.float32]


@dataclass
class Upsert:
    record: SourceRecord
    event: ImageEvent
    path: str
    id: int


@dataclass
class Delete:
    record: SourceRecord
    path: str
    id: int


@dataclass
class Batch:
    """A polled batch after decoding and collapsing; the input of every apply attempt."""

    records: list[SourceRecord]
    upserts: list[Upsert] = field(default_factory=list)
    deletes: list[Delete] = field(default_factory=list)
    rejected: list[DeadLetter] = field(default_factory=list)
    # (path, fingerprint) -> vector or dead letter, kept across retry attempts
    embedded: dict[tuple[str, str], Vector | DeadLetter] = field(default_factory=dict)

    @property
    def first_offsets(self) -> dict[tuple[str, int], int]:
        firsts: dict[tuple[str, int], int] = {}
        for record in self.records:
            where = (record.topic, record.partition)
            firsts[where] = min(firsts.get(where, record.offset), record.offset)
        return firsts

    @property
    def next_offsets(self) -> dict[tuple[str, int], int]:
        """The offsets to commit: one past the last record of each partition."""
        nexts: dict[tuple[str, int], int] = {}
        for record in self.records:
            where = (record.topic, record.partition)
            nexts[where] = max(nexts.get(where, 0), record.offset + 1)
        return nexts

    def describe_range(self) -> str:
        firsts, nexts = self.first_offsets, self.next_offsets
        return ",".join(f"{p}:{firsts[(t, p)]}-{nexts[(t, p)] - 1}"
                        for t, p in sorted(firsts))


@dataclass
class BatchResult:
    records: int
    embedded: int = 0
    reused: int = 0
    skipped: int = 0
    deleted: int = 0
    dead_lettered: int = 0
    dead_letter_reasons: Counter[str] = field(default_factory=Counter)


def prepare_batch(records: Sequence[SourceRecord], roots: list[Path]) -> Batch:
    """Decode events, collapse duplicates (last wins) and reject what must not be read."""
    batch = Batch(records=list(records))
    latest: dict[str, tuple[SourceRecord, ImageEvent]] = {}
    for record in records:
        try:
            event = decode_event(record.key, record.value)
        except BadEvent as error:
            batch.rejected.append(DeadLetter(record, BadEvent.reason, str(error)))
            continue
        path = normalise_path(event.path)
        latest.pop(path, None)  # re-insert so dict order follows the last event
        latest[path] = (record, event)

    for path, (record, event) in latest.items():
        try:
            reason = _refusal(path, roots)
        except (OSError, ValueError) as error:  # an odd path must not stop the worker
            reason = ("bad_message", f"unusable path: {error}")
        if reason:
            batch.rejected.append(DeadLetter(record, reason[0], reason[1]))
        elif event.kind == "delete":
            batch.deletes.append(Delete(record, path, path_id(path)))
        else:
            batch.upserts.append(Upsert(record, event, path, path_id(path)))
    return batch


def _refusal(path: str, roots: list[Path]) -> tuple[str, str] | None:
    """Why this path must not be touched, or None. The topic is not trusted input."""
    if not _inside_roots(path, roots):
        return "outside_roots", f"{path} is not under the watched roots"
    if not path_fits(path):
        size = len(path.encode("utf-8", "surrogateescape"))
        return "path_too_long", f"path is {size} UTF-8 bytes, the limit is 4096"
    return None


def _inside_roots(path: str, roots: list[Path]) -> bool:
    """Under a root both as written and with symlinks resolved (no escape via a link)."""
    if not is_under(path, roots):
        return False
    real_roots = [Path(os.path.realpath(root)) for root in roots]
    return is_under(os.path.realpath(path), real_roots)


@dataclass
class _FileState:
    upsert: Upsert
    size: int
    mtime_ns: int
    fingerprint: str


class Pipeline:
    """Applies batches for one model; holds no state between batches except clients."""

    def __init__(
        self,
        spec: ModelSpec,
        embedder: Embedder,
        store: VectorStore,
        index: PathIndex,
        dead_letters: DeadLetterWriter,
        pool: ThreadPoolExecutor,
        *,
        max_pixels: int,
        orphan_ttl_s: int,
    ) -> None:
        self.spec = spec
        self.embedder = embedder
        self.store = store
        self.index = index
        self.dead_letters = dead_letters
        self.pool = pool
        self.max_pixels = max_pixels
        self.orphan_ttl_s = orphan_ttl_s

    def apply(self, batch: Batch) -> BatchResult:
        """One attempt: raises ServiceUnavailable before anything is committed on a fault."""
        result = BatchResult(records=len(batch.records))
        letters = list(batch.rejected)

        existing = self._existing(batch)
        upserts = self._drop_collisions(batch.upserts, letters)
        states, result.skipped = self._read_files(upserts, existing, letters)

        vectors, result.reused = self._reuse_vectors(states, existing)
        result.embedded = self._embed_missing(batch, states, vectors, letters)

        indexed = [s for s in states if s.upsert.path in vectors]
        rows = [self._row(s, vectors[s.upsert.path]) for s in indexed]
        removed = [existing[d.path] for d in batch.deletes if d.path in existing]
        orphans = self._orphans_of(batch.deletes)

        self.store.upsert(self.spec, rows)
        self.store.delete(self.spec, [d.id for d in batch.deletes])
        reasons = self.dead_letters.publish(letters)
        self.index.apply(self._changes(indexed, removed, existing, orphans, reasons),
                         orphan_ttl_s=self.orphan_ttl_s)

        result.deleted = len(batch.deletes)
        result.dead_lettered = len(letters)
        result.dead_letter_reasons = reasons
        return result

    def _existing(self, batch: Batch) -> dict[str, IndexedFile]:
        paths = [u.path for u in batch.upserts] + [d.path for d in batch.deletes]
        found = self.index.get_many(paths)
        return {item.path: item for item in found if item is not None}

    def _drop_collisions(self, upserts: list[Upsert], letters: list[DeadLetter]) -> list[Upsert]:
        """An id owned by another path is never overwritten: that upsert is a dead letter."""
        owners = self.index.lookup_paths([u.id for u in upserts])
        kept = []
        for upsert, owner in zip(upserts, owners):
            if owner is not None and owner != upsert.path:
                detail = f"id {upsert.id} of {upsert.path} already belongs to {owner}"
                letters.append(DeadLetter(upsert.record, "id_collision", detail))
            else:
                kept.append(upsert)
        return kept

    def _read_files(
        self, upserts: list[Upsert], existing: dict[str, IndexedFile],
        letters: list[DeadLetter],
    ) -> tuple[list[_FileState], int]:
        """Stat each file (skip unchanged ones) and fingerprint the rest in the pool."""
        to_hash: list[tuple[Upsert, os.stat_result]] = []
        skipped = 0
        for upsert in upserts:
            info = _stat(upsert, letters)
            if info is None:
                continue
            known = existing.get(upsert.path)
            if known and known.size == info.st_size and known.mtime_ns == info.st_mtime_ns:
                skipped += 1
                continue
            to_hash.append((upsert, info))

        hashes = list(self.pool.map(lambda item: _fingerprint(item[0].path), to_hash))
        states = []
        for (upsert, info), fingerprint in zip(to_hash, hashes):
            if isinstance(fingerprint, tuple):
                letters.append(DeadLetter(upsert.record, fingerprint[0], fingerprint[1]))
                continue
            states.append(_FileState(upsert, info.st_size, info.st_mtime_ns, fingerprint))
        return states, skipped

    def _reuse_vectors(
        self, states: list[_FileState], existing: dict[str, IndexedFile]
    ) -> tuple[dict[str, Vector], int]:
        """Vectors already computed for the same bytes: own row, another path, a deleted file."""
        wanted = {s.fingerprint for s in states}
        candidates = self.index.ids_for_fingerprints(sorted(wanted))
        for s in states:
            known = existing.get(s.upsert.path)
            if known and known.fingerprint == s.fingerprint:
                candidates[s.fingerprint] = known.id

        rows = self.store.fetch_rows(self.spec, list(set(candidates.values())))
        by_fingerprint = {row.fingerprint: row.vector for row in rows.values()
                          if row.vector is not None and row.fingerprint in wanted}
        missing = sorted(wanted - set(by_fingerprint))
        by_fingerprint.update(self.index.orphan_vectors(missing))

        vectors = {s.upsert.path: by_fingerprint[s.fingerprint] for s in states
                   if s.fingerprint in by_fingerprint}
        return vectors, len(vectors)

    def _embed_missing(
        self, batch: Batch, states: list[_FileState], vectors: dict[str, Vector],
        letters: list[DeadLetter],
    ) -> int:
        """Run the model once per distinct new content; results survive a retried attempt.

        Returns how many files got their vector from the model.
        """
        todo: dict[str, _FileState] = {}
        for s in states:
            known = (s.upsert.path, s.fingerprint) in batch.embedded
            if s.upsert.path not in vectors and not known:
                todo.setdefault(s.fingerprint, s)
        if todo:
            paths = [s.upsert.path for s in todo.values()]
            outputs = self.embedder.embed_files(paths, max_pixels=self.max_pixels,
                                                pool=self.pool)
            for s, output in zip(todo.values(), outputs):
                batch.embedded[(s.upsert.path, s.fingerprint)] = (
                    DeadLetter(s.upsert.record, output.reason, output.detail)
                    if isinstance(output, Exception) else output
                )

        by_fingerprint = {fp: value for (_path, fp), value in batch.embedded.items()}
        embedded = 0
        for s in states:
            if s.upsert.path in vectors:
                continue
            value = batch.embedded.get((s.upsert.path, s.fingerprint),
                                       by_fingerprint.get(s.fingerprint))
            if isinstance(value, DeadLetter):
                letters.append(DeadLetter(s.upsert.record, value.reason, value.detail))
            elif value is not None:
                vectors[s.upsert.path] = value
                embedded += 1
        return embedded

    def _orphans_of(self, deletes: list[Delete]) -> dict[str, Vector]:
        """Keep the vectors of deleted files briefly: a rename's upsert may come later."""
        if not deletes:
            return {}
        rows = self.store.fetch_rows(self.spec, [d.id for d in deletes])
        return {row.fingerprint: row.vector for row in rows.values()
                if row.vector is not None and row.fingerprint}

    @staticmethod
    def _row(state: _FileState, vector: Vector) -> VectorRow:
        return VectorRow(id=state.upsert.id, path=state.upsert.path,
                         fingerprint=state.fingerprint, mtime_ns=state.mtime_ns,
                         vector=vector)

    @staticmethod
    def _changes(
        indexed: list[_FileState], removed: list[IndexedFile],
        existing: dict[str, IndexedFile], orphans: dict[str, Vector],
        reasons: Counter[str],
    ) -> MappingChanges:
        files = [IndexedFile(path=s.upsert.path, id=s.upsert.id, fingerprint=s.fingerprint,
                             size=s.size, mtime_ns=s.mtime_ns) for s in indexed]
        return MappingChanges(
            indexed=files,
            removed=removed,
            retired=[existing[f.path] for f in files if f.path in existing],
            orphans=orphans,
            dead_letters=dict(reasons),
        )


def _stat(upsert: Upsert, letters: list[DeadLetter]) -> os.stat_result | None:
    try:
        info = os.stat(upsert.path)
    except FileNotFoundError:
        letters.append(DeadLetter(upsert.record, "not_found", f"no such file {upsert.path}"))
        return None
    except PermissionError:
        letters.append(DeadLetter(upsert.record, "permission", f"cannot stat {upsert.path}"))
        return None
    except OSError as error:
        letters.append(DeadLetter(upsert.record, "not_found", f"{upsert.path}: {error}"))
        return None
    if not stat.S_ISREG(info.st_mode):
        letters.append(DeadLetter(upsert.record, "unsupported_format",
                                  f"{upsert.path} is not a regular file"))
        return None
    return info


def _fingerprint(path: str) -> str | tuple[str, str]:
    """The content hash, or (reason, detail) when the file cannot be read."""
    try:
        return file_fingerprint(path)
    except FileNotFoundError:
        return ("not_found", f"{path} vanished before it was read")
    except PermissionError:
        return ("permission", f"cannot read {path}")
    except OSError as error:
        return ("not_found", f"cannot read {path}: {error}")
