"""Plain-text tables for a terminal: one per model, then the fused ranking."""

from __future__ import annotations

import re

from searcher.fusion import RRF_K
from searcher.results import ModelResult, SearchResult

_CONTROL = re.compile(r"[\x00-\x1f\x7f]")


def printable(path: str) -> str:
    """A path safe to print on one line: undecodable bytes and control chars shown escaped."""
    text = path.encode("utf-8", "surrogateescape").decode("utf-8", "backslashreplace")
    return _CONTROL.sub(lambda match: repr(match.group())[1:-1], text)


def render_result(result: SearchResult) -> str:
    """The tables of one query; the fused table only when more than one model ran."""
    blocks = [f"query: {printable(result.query)}"]
    blocks += [_model_table(model) for model in result.models]
    if len(result.models) > 1:
        blocks.append(_fused_table(result))
    return "\n\n".join(blocks) + "\n"


def _model_table(model: ModelResult) -> str:
    header = (
        f"model {model.model} (version {model.version}, metric {model.metric.lower()}): "
        f"{len(model.hits)} results, {model.left_out} left out (files gone from disk)"
    )
    if model.reused_vector:
        header += ", query vector reused from the index"
    lines = [header, f"{'rank':>4}  {'score':>7}  path"]
    lines += [f"{hit.rank:>4}  {hit.score:>7.4f}  {printable(hit.path)}" for hit in model.hits]
    return "\n".join(lines)


def _fused_table(result: SearchResult) -> str:
    names = [model.model for model in result.models]
    widths = [max(len(name), 4) for name in names]
    header = "  ".join(f"{name:>{width}}" for name, width in zip(names, widths))
    lines = [
        f"fused (reciprocal rank fusion, k={RRF_K}; ranks per model, '-' = not in its list)",
        f"{'rank':>4}  {'rrf':>7}  {header}  path",
    ]
    for hit in result.fused:
        ranks = "  ".join(
            f"{hit.model_ranks.get(name, '-')!s:>{width}}" for name, width in zip(names, widths)
        )
        lines.append(f"{hit.rank:>4}  {hit.score:>7.5f}  {ranks}  {printable(hit.path)}")
    return "\n".join(lines)
