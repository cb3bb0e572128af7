"""Run the whole system as separate processes, the way an operator would.

The producer and one worker per model run as `python -m producer` / `python -m worker`
children with their logs in a folder; `wait_indexed` watches Redis until every file of a
set is indexed by every model, printing progress.
"""

from __future__ import annotations

import logging
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import TextIO

from common.errors import ImgSearchError
from common.ids import normalise_path, path_id
from common.mapping import PathIndex, connect_redis
from common.settings import Settings

log = logging.getLogger(__name__)


class PipelineError(ImgSearchError):
    """A child process died or indexing did not finish in time."""


@dataclass
class Child:
    name: str
    process: subprocess.Popen[bytes]
    log_file: Path

    def tail(self, lines: int = 15) -> str:
        text = self.log_file.read_text(errors="replace").splitlines()
        return "\n".join(text[-lines:])


@dataclass
class Pipeline:
    """The producer and the workers started for one run."""

    settings: Settings
    models: list[str]
    log_dir: Path
    env: dict[str, str]
    children: list[Child] = field(default_factory=list)

    def start(self) -> None:
        self.log_dir.mkdir(parents=True, exist_ok=True)
        for model in self.models:
            self._spawn(f"worker-{model}", ["worker", "--model", model])
        self._spawn("producer", ["producer"])

    def _spawn(self, name: str, args: list[str]) -> None:
        log_file = self.log_dir / f"{name}.log"
        with open(log_file, "ab") as handle:
            process = subprocess.Popen(  # noqa: S603 - our own modules
                [sys.executable, "-m", *args], stdout=handle, stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL, env=self.env,
            )
        self.children.append(Child(name, process, log_file))
        log.info("started process=%s pid=%d log=%s", name, process.pid, log_file)

    def check_alive(self) -> None:
        for child in self.children:
            code = child.process.poll()
            if code is not None:
                raise PipelineError(
                    f"{child.name} exited with code {code}; last lines of {child.log_file}:\n"
                    f"{child.tail()}"
                )

    def stop(self, timeout_s: float = 30.0) -> None:
        """SIGTERM everyone (producer first, so workers get its last events), then wait."""
        for child in reversed(self.children):
            if child.process.poll() is None:
                child.process.send_signal(signal.SIGTERM)
        deadline = time.monotonic() + timeout_s
        for child in self.children:
            remaining = max(0.1, deadline - time.monotonic())
            try:
                child.process.wait(timeout=remaining)
            except subprocess.TimeoutExpired:
                child.process.kill()
                child.process.wait()
        log.info("stopped processes=%d", len(self.children))


def child_env(settings: Settings) -> dict[str, str]:
    """The environment for children: ours, plus the settings that a caller overrode."""
    env = dict(os.environ)
    env["IMGSEARCH_WATCH__ROOTS"] = "[" + ",".join(f'"{r}"' for r in settings.watch.roots) + "]"
    env["IMGSEARCH_WATCH__SETTLE_S"] = str(settings.watch.settle_s)
    env["IMGSEARCH_KAFKA__BOOTSTRAP_SERVERS"] = settings.kafka.bootstrap_servers
    env["IMGSEARCH_MILVUS__URI"] = settings.milvus.uri
    env["IMGSEARCH_REDIS__URL"] = settings.redis.url
    env["IMGSEARCH_KAFKA__IMAGES_TOPIC"] = settings.kafka.images_topic
    env["IMGSEARCH_KAFKA__DEAD_LETTER_TOPIC"] = settings.kafka.dead_letter_topic
    env["IMGSEARCH_KAFKA__GROUP_PREFIX"] = settings.kafka.group_prefix
    env["IMGSEARCH_KAFKA__PARTITIONS"] = str(settings.kafka.partitions)
    env["IMGSEARCH_MILVUS__COLLECTION_PREFIX"] = settings.milvus.collection_prefix
    env["IMGSEARCH_REDIS__KEY_PREFIX"] = settings.redis.key_prefix
    env["IMGSEARCH_MODELS__ENABLED"] = "[" + ",".join(f'"{m}"' for m in
                                                      settings.models.enabled) + "]"
    return env


@contextmanager
def running(settings: Settings, models: list[str], log_dir: Path, keep: bool = False
            ) -> Iterator[Pipeline]:
    """Start the producer and one worker per model; stop them on exit unless `keep`."""
    pipeline = Pipeline(settings, models, log_dir, child_env(settings))
    pipeline.start()
    try:
        yield pipeline
    finally:
        if keep:
            pids = " ".join(str(c.process.pid) for c in pipeline.children)
            print(f"left running (pids {pids}); logs in {log_dir}", file=sys.stderr)
        else:
            pipeline.stop()


def indexed_counts(settings: Settings, models: Sequence[str], paths: Sequence[str]
                   ) -> dict[str, int]:
    """How many of `paths` each model has indexed: one Redis round trip per model."""
    ids = [path_id(normalise_path(path)) for path in paths]
    client = connect_redis(settings.redis)
    try:
        return {
            model: sum(
                found is not None
                for found in PathIndex(client, settings.redis.key_prefix, model)
                .lookup_paths(ids)
            )
            for model in models
        }
    finally:
        client.close()


def dead_letter_totals(settings: Settings, models: Sequence[str]) -> dict[str, int]:
    """Dead letters so far per model (all reasons), from the workers' counters in Redis."""
    client = connect_redis(settings.redis)
    try:
        return {
            model: sum(PathIndex(client, settings.redis.key_prefix, model)
                       .dead_letter_counts().values())
            for model in models
        }
    finally:
        client.close()


def wait_indexed(settings: Settings, models: Sequence[str], paths: Sequence[str],
                 timeout_s: float, out: TextIO = sys.stdout,
                 check: Callable[[], None] = lambda: None) -> dict[str, float]:
    """Block until every model has settled every path (indexed, or dead-lettered: a bad
    file must not hang the run); print progress; return seconds per model.

    `check` runs every second and raises to abort (e.g. a child process died).
    """
    total = len(paths)
    started = time.monotonic()
    baseline = indexed_counts(settings, models, paths)  # already indexed by an earlier run
    dead_before = dead_letter_totals(settings, models)
    finished: dict[str, float] = {}
    while len(finished) < len(models):
        check()
        elapsed = time.monotonic() - started
        if elapsed > timeout_s:
            raise PipelineError(f"indexing not finished after {timeout_s:.0f}s: {finished}")
        counts = indexed_counts(settings, models, paths)
        dead_now = dead_letter_totals(settings, models)
        dead = {model: dead_now[model] - dead_before.get(model, 0) for model in models}
        for model, done in counts.items():
            if done + dead[model] >= total and model not in finished:
                finished[model] = elapsed
        print(_progress_line(counts, baseline, dead, total, elapsed), file=out, flush=True)
        if len(finished) < len(models):
            time.sleep(1.0)
    return finished


def _progress_line(counts: dict[str, int], baseline: dict[str, int], dead: dict[str, int],
                   total: int, elapsed_s: float) -> str:
    parts = []
    for model, done in counts.items():
        settled = done + dead[model]
        rate = (settled - baseline[model]) / elapsed_s if elapsed_s > 0.5 else 0.0
        left = (total - settled) / rate if rate > 0 else float("inf")
        eta = ("done" if settled >= total
               else "?" if left == float("inf") else f"{left:.0f}s left")
        failed = f" ({dead[model]} dead-lettered)" if dead[model] else ""
        parts.append(f"{model} {done}/{total}{failed} {rate:.1f} img/s {eta}")
    return f"[{elapsed_s:5.1f}s] indexed: " + " | ".join(parts)
