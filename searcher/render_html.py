"""A self-contained HTML page: query and result thumbnails inline, so a person can judge
the results at a glance without a server and without the page reaching any file by URL.

Every piece of text that comes from a file name is escaped (a file named `<b>x</b>.jpg`
shows as text); images are JPEG thumbnails embedded as data: URIs made with Pillow.
"""

from __future__ import annotations

import base64
import html
import io
import logging
from collections.abc import Callable

from PIL import Image

from common.errors import ImgSearchError
from common.images import decode_image
from searcher.fusion import RRF_K
from searcher.render_text import printable
from searcher.results import FusedHit, ModelResult, RankedHit, SearchResult

log = logging.getLogger(__name__)

THUMBNAIL_PX = 160
_PLACEHOLDER_RGB = (200, 200, 200)

_STYLE = """
body { font-family: sans-serif; margin: 1.5em; color: #222; }
section.query { border-top: 2px solid #888; margin-top: 2em; }
div.grid { display: flex; flex-wrap: wrap; gap: 10px; }
figure { margin: 0; width: 170px; font-size: 12px; }
figure img { width: 160px; height: 160px; object-fit: contain; background: #eee; }
figcaption { word-break: break-all; }
.error { color: #b00; }
"""


class Thumbnails:
    """JPEG data: URIs by path, each file decoded once per page; unreadable files get a
    grey placeholder so the page still has one image element per result."""

    def __init__(self, max_pixels: int) -> None:
        self.max_pixels = max_pixels
        self._cache: dict[str, str] = {}

    def __call__(self, path: str) -> str:
        if path not in self._cache:
            self._cache[path] = _data_uri(self._thumbnail(path))
        return self._cache[path]

    def _thumbnail(self, path: str) -> Image.Image:
        try:
            image = decode_image(path, max_pixels=self.max_pixels, min_side=THUMBNAIL_PX)
        except (ImgSearchError, OSError) as error:
            log.warning("thumbnail failed path=%r error=%s", path, error)
            return Image.new("RGB", (THUMBNAIL_PX, THUMBNAIL_PX), _PLACEHOLDER_RGB)
        image.thumbnail((THUMBNAIL_PX, THUMBNAIL_PX))
        return image


def render_page(
    entries: list[SearchResult | tuple[str, str]], *, thumbnail: Callable[[str], str]
) -> str:
    """The whole page; an entry is a result or (query, error message) for a failed query."""
    sections = [
        _result_section(entry, thumbnail) if isinstance(entry, SearchResult)
        else _error_section(entry[0], entry[1], thumbnail)
        for entry in entries
    ]
    return (
        "<!DOCTYPE html>\n<html lang=\"en\">\n<head>\n<meta charset=\"utf-8\">\n"
        "<title>Image search results</title>\n"
        f"<style>{_STYLE}</style>\n</head>\n<body>\n<h1>Image search results</h1>\n"
        + "\n".join(sections)
        + "\n</body>\n</html>\n"
    )


def _result_section(result: SearchResult, thumbnail: Callable[[str], str]) -> str:
    parts = [_query_header(result.query, thumbnail)]
    parts += [_model_block(model, thumbnail) for model in result.models]
    if result.fused:
        parts.append(_fused_block(result.fused, thumbnail))
    return "<section class=\"query\">\n" + "\n".join(parts) + "\n</section>"


def _error_section(query: str, message: str, thumbnail: Callable[[str], str]) -> str:
    return (
        "<section class=\"query\">\n" + _query_header(query, thumbnail)
        + f"\n<p class=\"error\">{_text(message)}</p>\n</section>"
    )


def _query_header(query: str, thumbnail: Callable[[str], str]) -> str:
    return (
        f"<h2>Query: {_text(query)}</h2>\n"
        f"<figure>{_img(thumbnail(query), 'query ' + query)}</figure>"
    )


def _model_block(model: ModelResult, thumbnail: Callable[[str], str]) -> str:
    heading = (
        f"<h3>{_text(model.model)} <small>version {_text(model.version)}, "
        f"metric {_text(model.metric.lower())}, {len(model.hits)} results, "
        f"{model.left_out} left out (files gone from disk)</small></h3>"
    )
    figures = [_hit_figure(hit, thumbnail) for hit in model.hits]
    return heading + "\n<div class=\"grid\">\n" + "\n".join(figures) + "\n</div>"


def _hit_figure(hit: RankedHit, thumbnail: Callable[[str], str]) -> str:
    return (
        f"<figure>{_img(thumbnail(hit.path), hit.path)}"
        f"<figcaption>#{hit.rank} cosine {hit.score:.4f}<br>{_text(hit.path)}"
        "</figcaption></figure>"
    )


def _fused_block(fused: tuple[FusedHit, ...], thumbnail: Callable[[str], str]) -> str:
    heading = f"<h3>Fused <small>reciprocal rank fusion, k={RRF_K}</small></h3>"
    figures = [_fused_figure(hit, thumbnail) for hit in fused]
    return heading + "\n<div class=\"grid\">\n" + "\n".join(figures) + "\n</div>"


def _fused_figure(hit: FusedHit, thumbnail: Callable[[str], str]) -> str:
    ranks = ", ".join(f"{name} #{rank}" for name, rank in hit.model_ranks.items())
    return (
        f"<figure>{_img(thumbnail(hit.path), hit.path)}"
        f"<figcaption>#{hit.rank} rrf {hit.score:.5f}<br>{_text(ranks)}<br>"
        f"{_text(hit.path)}</figcaption></figure>"
    )


def _img(data_uri: str, alt: str) -> str:
    return f"<img src=\"{data_uri}\" alt=\"{_text(alt)}\">"


def _text(value: str) -> str:
    """Escaped for element text and quoted attributes alike."""
    return html.escape(printable(value), quote=True)


def _data_uri(image: Image.Image) -> str:
    buffer = io.BytesIO()
    image.convert("RGB").save(buffer, format="JPEG", quality=80)
    return "data:image/jpeg;base64," + base64.b64encode(buffer.getvalue()).decode("ascii")
