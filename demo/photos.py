"""Where the demo's photographs come from, and how they reach the watched folder."""

from __future__ import annotations

import csv
import logging
import shutil
from dataclasses import dataclass
from pathlib import Path

from common.errors import ImgSearchError
from common.settings import PROJECT_ROOT
from producer.filters import content_skip_reason, name_skip_reason

log = logging.getLogger(__name__)

UKBENCH = PROJECT_ROOT.parent / "shared" / "data" / "ukbench"
IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".webp", ".bmp", ".tif", ".tiff", ".gif"}
# scikit-image's bundled photographs (real scenes) that ship inside the package itself;
# the ones it would download on first use are left out.
SKIMAGE_PHOTOS = ("astronaut", "chelsea", "coffee", "rocket", "stereo_motorcycle",
                  "hubble_deep_field", "immunohistochemistry", "retina", "camera", "clock",
                  "coins", "moon")


@dataclass(frozen=True)
class PhotoSet:
    name: str
    folder: Path
    files: list[Path]
    groups: dict[str, int] | None  # file name -> ground-truth group, when known


def read_groundtruth(csv_path: Path) -> dict[str, int]:
    """A `file,group` CSV as {file name: group}."""
    with open(csv_path, newline="", encoding="utf-8") as handle:
        return {row["file"]: int(row["group"]) for row in csv.DictReader(handle)}


def from_folder(folder: Path, limit: int | None = None) -> PhotoSet:
    """Every image file under the folder (sub-folders too), in name order."""
    if not folder.is_dir():
        raise ImgSearchError(f"no such folder: {folder}")
    files = sorted(p for p in folder.rglob("*")
                   if p.suffix.lower() in IMAGE_SUFFIXES and p.is_file())
    truth_file = folder / "groundtruth.csv"
    groups = read_groundtruth(truth_file) if truth_file.exists() else None
    if limit is not None:
        files = files[:limit]
    return PhotoSet(folder.name, folder, files, groups)


def from_skimage(target: Path, limit: int | None = None) -> PhotoSet:
    """Write scikit-image's sample photographs as JPEGs (no download: they ship with it)."""
    from PIL import Image
    from skimage import data

    target.mkdir(parents=True, exist_ok=True)
    files = []
    for name in SKIMAGE_PHOTOS[:limit]:
        loader = getattr(data, name, None)
        if loader is None:  # names move between scikit-image releases
            log.warning("scikit-image has no sample named %s; skipped", name)
            continue
        pixels = loader()
        if isinstance(pixels, tuple):  # stereo pairs: keep the left view
            pixels = pixels[0]
        image = Image.fromarray(pixels).convert("RGB")
        path = target / f"{name}.jpg"
        image.save(path, quality=92)
        files.append(path)
    return PhotoSet("skimage", target, files, None)


def choose(folder: Path | None, scratch: Path, limit: int | None) -> PhotoSet:
    """A folder given on the command line, else UKBench from ../shared, else scikit-image's."""
    if folder is not None:
        return from_folder(folder, limit)
    if UKBENCH.is_dir():
        return from_folder(UKBENCH, limit)
    try:
        return from_skimage(scratch / "skimage-photos", limit)
    except ImportError as error:
        raise SystemExit(
            "no photographs: pass a folder, or `pip install scikit-image` for its samples"
        ) from error


def copy_into(photos: PhotoSet, root: Path, extensions: list[str]) -> list[Path]:
    """Copy the set into `root/<set name>/`; returns the copies the producer will publish.

    Files the producer skips by the same rules (not an image, hidden, temporary name) are
    copied too, but named in a warning and not waited for.
    """
    target = root / photos.name
    target.mkdir(parents=True, exist_ok=True)
    publishable = []
    for source in photos.files:
        destination = target / source.name
        shutil.copyfile(source, destination)  # a fresh mtime: every run republishes
        reason = (name_skip_reason(str(destination), [str(root)], extensions)
                  or content_skip_reason(str(destination)))
        if reason:
            log.warning("not published by the producer path=%s reason=%s", destination, reason)
            continue
        publishable.append(destination)
    log.info("copied files=%d publishable=%d into=%s", len(photos.files), len(publishable),
             target)
    return publishable
