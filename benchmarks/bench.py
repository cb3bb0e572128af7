"""Benchmark: prints a table and writes JSON; run with `make bench` (the stack must be up).

Measures, per model, on the 640x480 UKBench photographs and on phone-size 4000x3000 JPEGs
made from them (quality 90):
  1. compute ceiling: the ONNX model alone on pre-decoded tensors at its best batch size;
  2. decode + preprocess alone, one thread and the worker's thread pool;
  3. the worker pipeline, events in Kafka to rows in Milvus, and its ratio to the ceiling;
  4. the naive way (new session and fresh decode per image, one at a time) and our speed-up;
and once: 5. freshness (last write -> the searcher finds it), 6. query latency in-process
and for the whole `python -m searcher` command, 7. peak memory of one worker process.
Targets for a 2-core machine are printed beside the figures.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import onnxruntime as ort
from kafka import KafkaProducer
from PIL import Image

from common.embedder import Embedder, get_embedder
from common.events import ImageEvent
from common.ids import file_fingerprint, normalise_path, path_id
from common.images import decode_image
from common.kafka_io import ensure_images_topic, producer_options
from common.registry import ModelSpec, available_models
from common.settings import PROJECT_ROOT, Settings, load_settings
from demo.pipeline import child_env, indexed_counts

UKBENCH = PROJECT_ROOT.parent / "shared" / "data" / "ukbench"
RESULTS = PROJECT_ROOT / "benchmarks" / "results"
TARGETS = {
    "pipeline_vs_ceiling": 0.80,  # efficientnet-lite0, 640x480
    "speedup_small": 5.0,
    "speedup_phone": 10.0,
    "freshness_p95_s": 2.0,
    "query_p50_ms": 100.0,
}


def timed(action: Callable[[], object]) -> float:
    started = time.perf_counter()
    action()
    return time.perf_counter() - started


def percentile(values: Sequence[float], q: float) -> float:
    return float(np.percentile(np.asarray(values), q))


def make_phone_photos(sources: Sequence[Path], target: Path) -> list[Path]:
    """4000x3000 JPEGs at quality 90, upscaled from real photographs."""
    target.mkdir(parents=True, exist_ok=True)
    made = []
    for source in sources:
        path = target / f"phone-{source.stem}.jpg"
        if not path.exists():
            with Image.open(source) as image:
                image.convert("RGB").resize((4000, 3000), Image.Resampling.BICUBIC).save(
                    path, quality=90
                )
        made.append(path)
    return made


# 1. compute ceiling -------------------------------------------------------------------

def compute_ceiling(embedder: Embedder, tensors: np.ndarray) -> tuple[float, int]:
    """Best images/s over batch sizes, on tensors already decoded and preprocessed."""
    best = (0.0, 1)
    for batch in (1, 8, 16, 32, 64):
        if batch > len(tensors):
            break
        embedder.embed_arrays(tensors[:batch])  # warm-up for this shape
        rounds = max(1, len(tensors) // batch)
        seconds = min(
            timed(lambda: [embedder.embed_arrays(tensors[i * batch:(i + 1) * batch])
                           for i in range(rounds)])
            for _ in range(3)
        )
        rate = rounds * batch / seconds
        best = max(best, (rate, batch))
    return best


# 2. decode + preprocess ------------------------------------------------------------------

def decode_rate(embedder: Embedder, files: Sequence[Path], settings: Settings,
                threads: int) -> float:
    def one(path: Path) -> np.ndarray:
        image = decode_image(path, max_pixels=settings.images.max_pixels,
                             min_side=embedder.spec.resize_short)
        return embedder.preprocess(image)

    if threads == 1:
        seconds = timed(lambda: [one(path) for path in files])
    else:
        with ThreadPoolExecutor(threads) as pool:
            seconds = timed(lambda: list(pool.map(one, files)))
    return len(files) / seconds


def in_process_rate(embedder: Embedder, files: Sequence[Path], settings: Settings) -> float:
    """Decode + preprocess + embed with the worker's own code and pool, no services: the
    real ceiling of one worker process on this machine, since decoding and inference
    share the same cores."""
    paths = [str(p) for p in files]
    with ThreadPoolExecutor(settings.worker.decode_threads) as pool:
        embedder.embed_files(paths[:8], max_pixels=settings.images.max_pixels, pool=pool)
        seconds = timed(lambda: embedder.embed_files(
            paths, max_pixels=settings.images.max_pixels, pool=pool))
    return len(paths) / seconds


# 4. the naive way --------------------------------------------------------------------------

def naive_rate(spec: ModelSpec, model_file: Path, files: Sequence[Path]) -> float:
    """Tutorial-style: a new session and a full decode per image, one image at a time."""
    def one(path: Path) -> None:
        session = ort.InferenceSession(str(model_file), providers=["CPUExecutionProvider"])
        image = Image.open(path).convert("RGB").resize((spec.input_size, spec.input_size))
        pixels = np.asarray(image, dtype=np.float32)[None]
        name = session.get_inputs()[0]
        if name.shape[1] == 3:
            pixels = pixels.transpose(0, 3, 1, 2)
        session.run(None, {name.name: pixels})

    return len(files) / timed(lambda: [one(path) for path in files])


# 3. the worker pipeline, 7. peak memory -----------------------------------------------------

def isolated_settings(root: Path) -> Settings:
    unique = uuid.uuid4().hex[:8]
    return load_settings(
        kafka={"images_topic": f"bench.{unique}.images",
               "dead_letter_topic": f"bench.{unique}.dead", "group_prefix": f"bench-{unique}"},
        milvus={"collection_prefix": f"bench_{unique}"},
        redis={"key_prefix": f"bench:{unique}"},
        watch={"roots": [str(root)]},
    )


def publish(settings: Settings, files: Sequence[Path]) -> None:
    """One upsert event per file on the isolated images topic, as the producer sends them."""
    producer = KafkaProducer(**producer_options(settings.kafka))
    for path in files:
        stat = path.stat()
        event = ImageEvent(kind="upsert", path=normalise_path(path), size=stat.st_size,
                           mtime_ns=stat.st_mtime_ns, fingerprint=file_fingerprint(path))
        producer.send(settings.kafka.images_topic, key=event.key, value=event.encode())
    producer.flush()
    producer.close()


def wait_rows(settings: Settings, model: str, paths: list[str], timeout_s: float) -> float:
    """Seconds until every path has its row (the mapping is written after Milvus).

    Light on purpose (ids computed once, one client, a 50 ms period): the worker under
    measurement may share this process and its interpreter lock.
    """
    from common.mapping import PathIndex, connect_redis

    ids = [path_id(path) for path in paths]
    client = connect_redis(settings.redis)
    index = PathIndex(client, settings.redis.key_prefix, model)
    started = time.monotonic()
    try:
        while sum(found is not None for found in index.lookup_paths(ids)) < len(ids):
            if time.monotonic() - started > timeout_s:
                raise RuntimeError(f"{model}: not indexed after {timeout_s:.0f}s")
            time.sleep(0.05)
    finally:
        client.close()
    return time.monotonic() - started


def pipeline_rate(model: str, files: Sequence[Path]) -> float:
    """Steady-state images/s of one in-process worker: events in Kafka to rows in Milvus.

    The worker is started and warmed on one event first (model loaded, partitions
    assigned), so start-up is not counted; then the rest are published and timed.
    """
    import threading

    from worker import Worker

    settings = isolated_settings(files[0].parent)
    ensure_images_topic(settings.kafka)
    worker = Worker(settings, model)
    stop = threading.Event()
    loop = threading.Thread(target=worker.run, args=(stop,), daemon=True)
    loop.start()
    try:
        publish(settings, files[:1])
        wait_rows(settings, model, [normalise_path(files[0])], 120)
        rest = [normalise_path(p) for p in files[1:]]
        started = time.monotonic()
        publish(settings, files[1:])
        wait_rows(settings, model, rest, 900)
        seconds = time.monotonic() - started
    finally:
        stop.set()
        loop.join(timeout=60)
        worker.close()
    return len(rest) / seconds


def worker_peak_memory(model: str, files: Sequence[Path]) -> float:
    """Peak resident memory (MiB) of one `python -m worker` process indexing the files."""
    settings = isolated_settings(files[0].parent)
    ensure_images_topic(settings.kafka)
    publish(settings, files)
    worker = subprocess.Popen([sys.executable, "-m", "worker", "--model", model],
                              env=child_env(settings), stdout=subprocess.DEVNULL,
                              stderr=subprocess.DEVNULL)
    try:
        wait_rows(settings, model, [normalise_path(p) for p in files], 900)
    finally:
        peak_kib = _stop_and_peak_memory(worker)
    return peak_kib / 1024


def _stop_and_peak_memory(process: subprocess.Popen) -> float:
    """SIGTERM, wait, and return the child's peak resident set (KiB) from its status file."""
    peak = 0.0
    status = Path(f"/proc/{process.pid}/status")
    try:
        for line in status.read_text().splitlines():
            if line.startswith("VmHWM:"):
                peak = float(line.split()[1])
    except FileNotFoundError:
        pass
    process.terminate()
    process.wait(timeout=60)
    return peak or resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss


# 5. freshness, 6. query latency ---------------------------------------------------------

def freshness(settings: Settings, models: list[str], sources: Sequence[Path],
              drop_dir: Path) -> list[float]:
    """Seconds from a file's last write until every model's index answers for it."""
    drop_dir.mkdir(parents=True, exist_ok=True)
    delays = []
    for index, source in enumerate(sources):
        target = drop_dir / f"fresh-{index:03d}.jpg"
        data = source.read_bytes()
        with open(target, "wb") as handle:
            handle.write(data)
        written = time.monotonic()
        while indexed_counts(settings, models, [str(target)]) != dict.fromkeys(models, 1):
            if time.monotonic() - written > 30:
                raise RuntimeError(f"{target} not indexed after 30 s")
            time.sleep(0.01)
        delays.append(time.monotonic() - written)
    return delays


def query_latency(settings: Settings, queries: Sequence[Path]) -> list[float]:
    """In-process: decode + embed under every model + search + path lookup, per query."""
    from searcher import Searcher

    with Searcher(settings) as searcher:
        searcher.search(str(queries[0]), k=10)  # sessions and clients warm
        return [timed(lambda q=q: searcher.search(str(q), k=10)) for q in queries]


def cli_latency(settings: Settings, query: Path, runs: int) -> list[float]:
    env = child_env(settings)
    command = [sys.executable, "-m", "searcher", str(query), "-k", "10"]
    return [timed(lambda: subprocess.run(command, env=env, check=True,
                                         stdout=subprocess.DEVNULL)) for _ in range(runs)]


def live_measures(models: list[str], small: Sequence[Path], work: Path,
                  fresh_count: int) -> dict[str, float]:
    """Index the small set through producer + workers, then freshness and query latency."""
    from demo.pipeline import running, wait_indexed

    root = work / "watched"
    root.mkdir(parents=True, exist_ok=True)
    settings = isolated_settings(root)
    with running(settings, models, work / "logs") as pipeline:
        copies = []
        for source in small:
            target = root / "library" / source.name
            target.parent.mkdir(exist_ok=True)
            target.write_bytes(source.read_bytes())
            copies.append(str(target))
        wait_indexed(settings, models, copies, 900, sys.stderr, pipeline.check_alive)
        delays = freshness(settings, models, small[:fresh_count], root / "drops")
        queries = [work / f"query-{p.name}" for p in small[:40]]
        for query, source in zip(queries, small[:40]):
            query.write_bytes(source.read_bytes())
        in_process = query_latency(settings, queries)
        whole = cli_latency(settings, queries[0], 5)
    return {
        "indexed_for_queries": len(copies),
        "freshness_p50_s": percentile(delays, 50), "freshness_p95_s": percentile(delays, 95),
        "query_p50_ms": percentile(in_process, 50) * 1000,
        "query_p95_ms": percentile(in_process, 95) * 1000,
        "cli_p50_s": percentile(whole, 50), "cli_p95_s": percentile(whole, 95),
    }


# the run ------------------------------------------------------------------------------------

def per_model(spec: ModelSpec, settings: Settings, inputs: dict[str, list[Path]],
              naive_count: int) -> dict[str, dict[str, float]]:
    embedder = get_embedder(spec.name, settings)
    threads = settings.worker.decode_threads
    figures: dict[str, dict[str, float]] = {}
    for label, files in inputs.items():
        tensors = np.stack([
            embedder.preprocess(decode_image(p, max_pixels=settings.images.max_pixels,
                                             min_side=spec.resize_short))
            for p in files[:64]
        ])
        ceiling, batch = compute_ceiling(embedder, tensors)
        pipeline = pipeline_rate(spec.name, files)
        naive = naive_rate(spec, spec.path, files[:naive_count])
        decode_and_embed = in_process_rate(embedder, files, settings)
        figures[label] = {
            "ceiling_images_per_s": ceiling, "ceiling_batch": batch,
            "decode_1_thread_images_per_s": decode_rate(embedder, files, settings, 1),
            f"decode_{threads}_threads_images_per_s": decode_rate(embedder, files, settings,
                                                                  threads),
            "decode_and_embed_images_per_s": decode_and_embed,
            "pipeline_images_per_s": pipeline,
            "pipeline_vs_ceiling": pipeline / ceiling,
            "pipeline_vs_decode_and_embed": pipeline / decode_and_embed,
            "naive_images_per_s": naive,
            "speedup_vs_naive": pipeline / naive,
            "worker_peak_rss_mib": worker_peak_memory(spec.name, files),
        }
    return figures


def print_report(report: dict) -> None:
    print("\nimages/s: ceiling = model alone on ready tensors; dec = decode + preprocess; "
          "dec+emb = both\nin-process with the worker's pool, no services; pipeline = Kafka "
          "events to Milvus rows")
    print(f"\n{'model':20s} {'input':6s} {'ceiling':>9s} {'dec x1':>8s} {'dec pool':>9s} "
          f"{'dec+emb':>8s} {'pipeline':>9s} {'/ceil':>6s} {'/d+e':>6s} {'naive':>7s} "
          f"{'speedup':>8s} {'peak MiB':>9s}")
    for model, inputs in report["models"].items():
        for label, f in inputs.items():
            pool = next(v for k, v in f.items() if k.startswith("decode_") and "_1_" not in k)
            print(f"{model:20s} {label:6s} {f['ceiling_images_per_s']:9.1f} "
                  f"{f['decode_1_thread_images_per_s']:8.1f} {pool:9.1f} "
                  f"{f['decode_and_embed_images_per_s']:8.1f} "
                  f"{f['pipeline_images_per_s']:9.1f} {f['pipeline_vs_ceiling']:6.2f} "
                  f"{f['pipeline_vs_decode_and_embed']:6.2f} "
                  f"{f['naive_images_per_s']:7.2f} {f['speedup_vs_naive']:8.1f} "
                  f"{f['worker_peak_rss_mib']:9.0f}")
    live = report["live"]
    print(f"\nfreshness p50 {live['freshness_p50_s']:.2f}s p95 {live['freshness_p95_s']:.2f}s"
          f" (target p95 < {TARGETS['freshness_p95_s']}s)")
    print(f"query in-process p50 {live['query_p50_ms']:.0f} ms p95 {live['query_p95_ms']:.0f} ms"
          f" with {live['indexed_for_queries']} indexed (target p50 < "
          f"{TARGETS['query_p50_ms']:.0f} ms); whole CLI p50 {live['cli_p50_s']:.2f}s")
    print("\ntargets:")
    for line in report["verdicts"]:
        print("  " + line)


def verdicts(report: dict) -> list[str]:
    lines = []
    eff = report["models"].get("efficientnet-lite0", {})
    if "small" in eff:
        ratio = eff["small"]["pipeline_vs_ceiling"]
        lines.append(_verdict("efficientnet-lite0 pipeline / ceiling (640x480)", ratio,
                              TARGETS["pipeline_vs_ceiling"], higher=True))
    for model, inputs in report["models"].items():
        for label, key in (("small", "speedup_small"), ("phone", "speedup_phone")):
            if label in inputs:
                lines.append(_verdict(f"{model} speed-up vs naive ({label})",
                                      inputs[label]["speedup_vs_naive"], TARGETS[key], True))
    live = report["live"]
    lines.append(_verdict("freshness p95 s", live["freshness_p95_s"],
                          TARGETS["freshness_p95_s"], higher=False))
    lines.append(_verdict("query p50 ms", live["query_p50_ms"], TARGETS["query_p50_ms"],
                          higher=False))
    return lines


def _verdict(name: str, value: float, target: float, higher: bool) -> str:
    met = value >= target if higher else value <= target
    sign = ">=" if higher else "<="
    return f"{'MET ' if met else 'MISS'} {name}: {value:.2f} (target {sign} {target})"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--images", type=int, default=200, help="640x480 photos per run")
    parser.add_argument("--phone", type=int, default=24, help="phone-size photos per run")
    parser.add_argument("--naive", type=int, default=16, help="images for the naive way")
    parser.add_argument("--fresh", type=int, default=50, help="files dropped one by one")
    parser.add_argument("--indexed", type=int, default=400, help="indexed for query latency")
    parser.add_argument("--out", type=Path, default=RESULTS / "bench.json")
    args = parser.parse_args(argv)

    if not UKBENCH.is_dir():
        print(f"bench: needs the UKBench photographs at {UKBENCH}", file=sys.stderr)
        return 1
    settings = load_settings()
    specs = available_models(settings)
    all_photos = sorted(UKBENCH.glob("*.jpg"))
    with tempfile.TemporaryDirectory(prefix="imgsearch-bench-") as scratch:
        work = Path(scratch)
        small_dir = work / "small"
        small_dir.mkdir()
        small = []
        for source in all_photos[: args.images]:
            small.append(small_dir / source.name)
            small[-1].write_bytes(source.read_bytes())
        phone = make_phone_photos(all_photos[: args.phone], work / "phone")
        inputs = {"small": small, "phone": phone}
        report: dict = {"machine": {"cpus": os.cpu_count()}, "models": {}}
        for spec in specs:
            print(f"measuring {spec.name} ...", file=sys.stderr)
            report["models"][spec.name] = per_model(spec, settings, inputs, args.naive)
        report["live"] = live_measures([s.name for s in specs], all_photos[: args.indexed],
                                       work / "live", args.fresh)
    report["targets"] = TARGETS
    report["verdicts"] = verdicts(report)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2))
    print_report(report)
    print(f"\nwrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
