"""`python -m searcher QUERY [QUERY ...]`: which of my images look like this one?

Prints a table per model and a fused ranking (or one JSON document with --json, and/or a
self-contained HTML page with --html). Errors are one line on stderr and a non-zero exit:
1 for a failed query or service, 2 for bad arguments or settings.
"""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

from common.errors import ImgSearchError, SettingsError
from common.logs import configure_logging
from common.settings import Settings, load_settings, log_effective
from searcher.api import Searcher
from searcher.errors import QueryError
from searcher.render_html import Thumbnails, render_page
from searcher.render_json import render_document
from searcher.render_text import render_result
from searcher.results import SearchResult

log = logging.getLogger("searcher")

PROG = "searcher"
MAX_K = 1000

Entry = SearchResult | tuple[str, str]


def main(argv: list[str] | None = None) -> int:
    parser = _parser()
    args = parser.parse_args(argv)
    if args.html and not args.html.resolve().parent.is_dir():
        parser.error(f"--html: folder {args.html.resolve().parent} does not exist")
    configure_logging(args.log_level)
    try:
        settings = load_settings()
    except SettingsError as error:
        return _fail(error, code=2)
    log_effective(settings, "searcher")

    try:
        entries = _run(settings, args)
    except ImgSearchError as error:
        return _fail(error)
    except KeyboardInterrupt:
        return 130

    try:
        _emit(entries, args, settings)
    except OSError as error:
        return _fail(error)
    return 1 if any(isinstance(entry, tuple) for entry in entries) else 0


def _run(settings: Settings, args: argparse.Namespace) -> list[Entry]:
    """Search every query; an unreadable query is reported and the others still run."""
    entries: list[Entry] = []
    with Searcher(settings) as searcher:
        specs = searcher.resolve_models(args.model)
        for query in args.queries:
            try:
                entries.append(searcher.search(query, specs, args.k, min_score=args.min_score))
            except QueryError as error:
                _fail(error)
                entries.append((query, _one_line(error)))
    return entries


def _emit(entries: list[Entry], args: argparse.Namespace, settings: Settings) -> None:
    """stdout carries only the results: tables, or the JSON document."""
    if args.html:
        page = render_page(entries, thumbnail=Thumbnails(settings.images.max_pixels))
        args.html.write_text(page, encoding="utf-8")
        log.info("html written file=%s queries=%d", args.html, len(entries))
    if args.json:
        sys.stdout.write(render_document(entries) + "\n")
        return
    results = [entry for entry in entries if isinstance(entry, SearchResult)]
    sys.stdout.write("\n".join(render_result(result) for result in results))


def _fail(error: BaseException, code: int = 1) -> int:
    print(f"{PROG}: {_one_line(error)}", file=sys.stderr)
    return code


def _one_line(error: BaseException) -> str:
    return " ".join(str(error).split()) or type(error).__name__


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog=f"python -m {PROG}", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("queries", nargs="+", metavar="QUERY", help="query image file(s)")
    parser.add_argument("--model", action="append", metavar="NAME",
                        help="model to search (repeatable; default: every indexed model)")
    parser.add_argument("-k", type=_k_value, default=10, help="results per model (default 10)")
    parser.add_argument("--min-score", type=_cosine, default=None, metavar="S",
                        help="leave out results whose cosine similarity is below S")
    parser.add_argument("--json", action="store_true", help="print one JSON document")
    parser.add_argument("--html", type=Path, metavar="FILE",
                        help="also write a self-contained HTML page with thumbnails")
    parser.add_argument("--log-level", default="WARNING",
                        choices=["DEBUG", "INFO", "WARNING", "ERROR"],
                        help="log level on stderr (default WARNING)")
    return parser


def _cosine(text: str) -> float:
    """A cosine similarity threshold: a number from -1 to 1."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a number: {text!r}") from None
    if not -1.0 <= value <= 1.0:
        raise argparse.ArgumentTypeError(f"{value} is not a cosine similarity (-1 to 1)")
    return value


def _k_value(text: str) -> int:
    value = int(text)
    if not 1 <= value <= MAX_K:
        raise argparse.ArgumentTypeError(f"must be between 1 and {MAX_K}")
    return value


if __name__ == "__main__":
    sys.exit(main())
