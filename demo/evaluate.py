"""`python -m demo.evaluate FOLDER [--groundtruth CSV]`: retrieval quality through the system.

Copies the folder into the watched folder (the running producer and workers index it, or
this command starts them), queries every image by its indexed path (the stored vector is
reused, so this measures the index, not re-decoding), and reports per model and fused:
the UKBench score, mean average precision and recall@1, plus files indexed and
dead-lettered. Writes a JSON file and a markdown table.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import time
from collections.abc import Sequence
from pathlib import Path

from common.errors import ImgSearchError
from common.ids import normalise_path
from common.logs import configure_logging
from common.settings import PROJECT_ROOT, Settings, load_settings, log_effective
from demo import photos
from demo.__main__ import pick_models
from demo.metrics import Scores, score_rankings
from demo.pipeline import dead_letter_totals, indexed_counts, running, wait_indexed
from searcher import Searcher

log = logging.getLogger("demo.evaluate")

RESULTS_DIR = PROJECT_ROOT / "var" / "eval"
RANK_DEPTH = 20  # results per query kept for the metrics


def collect_rankings(settings: Settings, paths: Sequence[Path], models: list[str]
                     ) -> dict[str, dict[str, list[str]]]:
    """{model or 'fused': {query file name: result file names, best first}}.

    Only results that are files of the evaluated set count (matched by full path), so
    other indexed copies of the same photographs cannot inflate the scores.
    """
    names = {normalise_path(path): path.name for path in paths}
    rankings: dict[str, dict[str, list[str]]] = {name: {} for name in [*models, "fused"]}
    with Searcher(settings) as searcher:
        for path in paths:
            result = searcher.search(str(path), models=models, k=RANK_DEPTH)
            for model_result in result.models:
                rankings[model_result.model][path.name] = names_in_set(
                    [hit.path for hit in model_result.hits], names)
            rankings["fused"][path.name] = names_in_set(
                [hit.path for hit in result.fused], names)
    if len(models) < 2:
        rankings.pop("fused")
    return rankings


def names_in_set(result_paths: Sequence[str], names: dict[str, str]) -> list[str]:
    """The file names of the results that belong to the evaluated set, in rank order."""
    return [names[path] for path in result_paths if path in names]


def markdown_table(scores: dict[str, Scores], indexed: dict[str, int], dead: dict[str, int],
                   total: int) -> str:
    lines = [
        "| ranking | UKBench score (of 4) | mAP | recall@1 | indexed | dead-lettered |",
        "| --- | --- | --- | --- | --- | --- |",
    ]
    for name, score in scores.items():
        count = f"{indexed[name]}/{total}" if name in indexed else "-"
        lines.append(f"| {name} | {score.ukbench:.3f} | {score.mean_ap:.3f} | "
                     f"{score.recall_at_1:.3f} | {count} | {dead.get(name, '-')} |")
    return "\n".join(lines)


def evaluate(settings: Settings, photo_set: photos.PhotoSet, models: list[str],
             out_dir: Path, start_pipeline: bool, timeout_s: float) -> dict:
    """Index the set through the system, query every image, score, and write the reports."""
    if not photo_set.groups:
        raise ImgSearchError(f"no ground truth for {photo_set.folder} (file,group CSV)")
    root = settings.watch.roots[0]
    copied = photos.copy_into(photo_set, root, settings.watch.extensions)

    started = time.monotonic()
    paths = [str(p) for p in copied]
    dead_before = dead_letter_totals(settings, models)
    if start_pipeline:
        with running(settings, models, out_dir / "logs") as pipeline:
            wait_indexed(settings, models, paths, timeout_s, sys.stderr, pipeline.check_alive)
    else:
        wait_indexed(settings, models, paths, timeout_s, sys.stderr)
    indexed = indexed_counts(settings, models, paths)
    dead_after = dead_letter_totals(settings, models)
    dead = {model: dead_after[model] - dead_before[model] for model in models}
    index_s = time.monotonic() - started

    rankings = collect_rankings(settings, copied, models)
    groups = {name: group for name, group in photo_set.groups.items()}
    scores = {name: score_rankings(ranked, groups) for name, ranked in rankings.items()}
    report = {
        "folder": str(photo_set.folder), "files": len(copied), "models": models,
        "indexed": indexed, "dead_lettered": dead,
        "index_seconds": round(index_s, 1),
        "scores": {name: score.as_dict() for name, score in scores.items()},
    }
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "eval.json").write_text(json.dumps(report, indent=2))
    table = markdown_table(scores, indexed, dead, len(copied))
    (out_dir / "eval.md").write_text(table + "\n")
    print(table)
    return report


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m demo.evaluate", description=__doc__)
    parser.add_argument("folder", nargs="?", type=Path, default=photos.UKBENCH)
    parser.add_argument("--groundtruth", type=Path, help="file,group CSV "
                        "(default: FOLDER/groundtruth.csv)")
    parser.add_argument("--limit", type=int, help="only the first N images")
    parser.add_argument("--out", type=Path, default=RESULTS_DIR)
    parser.add_argument("--no-start", action="store_true",
                        help="producer and workers already run; only wait for them")
    parser.add_argument("--timeout", type=float, default=900.0)
    args = parser.parse_args(argv)

    settings = load_settings()
    configure_logging(settings.log_level)
    logging.getLogger("searcher").setLevel(logging.WARNING)  # not 3 lines for every query
    log_effective(settings, "evaluate")
    try:
        photo_set = photos.from_folder(args.folder, args.limit)
        if args.groundtruth:
            photo_set = photos.PhotoSet(photo_set.name, photo_set.folder, photo_set.files,
                                        photos.read_groundtruth(args.groundtruth))
        models = pick_models(settings)
        evaluate(settings, photo_set, models, args.out, not args.no_start, args.timeout)
    except ImgSearchError as error:
        print(f"evaluate: {error}", file=sys.stderr)
        return 1
    print(f"wrote {args.out / 'eval.json'} and {args.out / 'eval.md'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
