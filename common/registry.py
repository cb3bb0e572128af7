"""The model registry: which ONNX models exist, where their files are, how to feed them.

Entries live in a TOML file (settings.models.registry_file, by default common/models.toml),
one `[models.NAME]` table each. `resolve_model` locates the file and derives the effective
version: the declared version plus a short hash of the file's sha256 and every
preprocessing field, so vectors from a different file or recipe never share a collection.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import logging
import math
import re
import threading
import tomllib
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from common.errors import ImgSearchError
from common.settings import Settings

log = logging.getLogger(__name__)

LAYOUTS = ("NCHW", "NHWC")
CHANNEL_ORDERS = ("RGB", "BGR")
RESIZE_MODES = ("short_side", "square")
METRICS = ("COSINE",)
MAX_SIDE = 4096
"""Upper bound for input_size and resize_short: larger is a typo, and costs memory."""
_SHA256 = re.compile(r"[0-9a-fA-F]{64}")
_SOURCE_KEYS = ("file", "package", "package_file", "url", "sha256", "export", "extra")

_REQUIRED = ("version", "input", "layout", "input_size", "resize_short", "channel_order",
             "mean", "std", "output", "dim")
_OPTIONAL = ("file", "package", "package_file", "url", "sha256", "export", "resize",
             "metric", "logits", "golden", "description", "extra")


class RegistryError(ImgSearchError):
    """The registry file is unreadable or an entry is invalid; the message names it."""


class UnknownModel(ImgSearchError):
    """A model name that the registry does not declare."""


class ModelUnavailable(ImgSearchError):
    """A declared model whose file is not on this machine; the message says how to get it."""


class VersionMismatch(ImgSearchError):
    """Vectors of one model version would be mixed with those of another."""


@dataclass(frozen=True)
class ModelSource:
    """Where a model file comes from; exactly one of `file` or `package` locates it."""

    file: str | None = None
    package: str | None = None
    package_file: str | None = None
    url: str | None = None
    sha256: str | None = None
    export: str | None = None
    extra: str | None = None

    @property
    def file_name(self) -> str:
        """The name the file has in the cache directory."""
        if self.file:
            return Path(self.file).name
        if self.package_file:
            return Path(self.package_file).name
        return Path(self.url or "model.onnx").name


@dataclass(frozen=True)
class ModelSpec:
    """One model and its preprocessing. Only specs from `resolve_model` carry a file,
    its sha256 and the effective `version`; `load_registry` gives the declared version."""

    name: str
    version: str
    dim: int
    metric: str
    input_size: int
    resize_short: int
    resize: str = "short_side"
    input_name: str = "input"
    layout: str = "NCHW"
    channel_order: str = "RGB"
    mean: tuple[float, float, float] = (0.0, 0.0, 0.0)
    std: tuple[float, float, float] = (1.0, 1.0, 1.0)
    output: str = "embedding"
    logits: str | None = None
    golden: tuple[tuple[str, int], ...] = ()
    declared_version: str = ""
    source: ModelSource = field(default_factory=ModelSource)
    path: Path | None = None
    file_sha256: str | None = None
    description: str = ""

    def preprocessing(self) -> dict[str, Any]:
        """Every field that changes the vectors for a given file."""
        return {
            "input": self.input_name, "layout": self.layout, "input_size": self.input_size,
            "resize": self.resize, "resize_short": self.resize_short,
            "channel_order": self.channel_order, "mean": list(self.mean),
            "std": list(self.std), "output": self.output, "dim": self.dim,
            "metric": self.metric,
        }


def load_registry(path: Path) -> dict[str, ModelSpec]:
    """Parse and validate every entry of the registry file (files are not located here)."""
    try:
        with open(path, "rb") as handle:
            document = tomllib.load(handle)
    except OSError as e:
        raise RegistryError(f"cannot read model registry {path}: {e}") from e
    except tomllib.TOMLDecodeError as e:
        raise RegistryError(f"model registry {path} is not valid TOML: {e}") from e
    except UnicodeDecodeError as e:
        raise RegistryError(f"model registry {path} is not UTF-8 text: {e}") from e

    tables = document.get("models")
    if not isinstance(tables, dict) or not tables:
        raise RegistryError(f"model registry {path} declares no [models.NAME] tables")
    return {name: _parse_entry(name, entry, path) for name, entry in tables.items()}


def _parse_entry(name: str, entry: Any, path: Path) -> ModelSpec:
    where = f"model {name!r} in {path}"
    if not isinstance(entry, dict):
        raise RegistryError(f"{where}: expected a table")
    _check_keys(entry, where)

    try:
        spec = ModelSpec(
            name=name,
            version=_text(entry["version"], "version", where),
            declared_version=_text(entry["version"], "version", where),
            dim=_positive_int(entry["dim"], "dim", where),
            metric=_choice(entry.get("metric", "COSINE"), METRICS, "metric", where),
            input_size=_side(entry["input_size"], "input_size", where),
            resize_short=_side(entry["resize_short"], "resize_short", where),
            resize=_choice(entry.get("resize", "short_side"), RESIZE_MODES, "resize", where),
            input_name=_text(entry["input"], "input", where),
            layout=_choice(entry["layout"], LAYOUTS, "layout", where),
            channel_order=_choice(entry["channel_order"], CHANNEL_ORDERS, "channel_order",
                                  where),
            mean=_triple(entry["mean"], "mean", where),
            std=_triple(entry["std"], "std", where),
            output=_text(entry["output"], "output", where),
            logits=_optional_text(entry, "logits", where),
            golden=tuple(sorted((str(k), int(v)) for k, v in entry.get("golden", {}).items())),
            source=_parse_source(entry, where),
            description=_optional_text(entry, "description", where) or "",
        )
    except (TypeError, ValueError, AttributeError) as e:
        raise RegistryError(f"{where}: {e}") from e

    _check_geometry(spec, where)
    return spec


def _check_keys(entry: dict[str, Any], where: str) -> None:
    missing = [key for key in _REQUIRED if key not in entry]
    if missing:
        raise RegistryError(f"{where}: missing {', '.join(missing)}")
    unknown = sorted(set(entry) - set(_REQUIRED) - set(_OPTIONAL))
    if unknown:
        raise RegistryError(f"{where}: unknown keys {', '.join(unknown)}")


def _parse_source(entry: dict[str, Any], where: str) -> ModelSource:
    source = ModelSource(**{key: _optional_text(entry, key, where) for key in _SOURCE_KEYS})
    if bool(source.file) == bool(source.package):
        raise RegistryError(f"{where}: set exactly one of 'file' or 'package'")
    if source.package and not source.package_file:
        raise RegistryError(f"{where}: 'package' needs 'package_file'")
    if source.url and not source.sha256:
        raise RegistryError(f"{where}: 'url' needs 'sha256' to check the download")
    if source.sha256 is not None and not _SHA256.fullmatch(source.sha256):
        raise RegistryError(f"{where}: 'sha256' must be 64 hex digits")
    return source


def _check_geometry(spec: ModelSpec, where: str) -> None:
    if spec.resize_short < spec.input_size:
        raise RegistryError(f"{where}: resize_short {spec.resize_short} is smaller than "
                            f"input_size {spec.input_size}")
    if any(value <= 0 for value in spec.std):
        raise RegistryError(f"{where}: std values must be > 0, got {list(spec.std)}")


def _positive_int(value: Any, key: str, where: str) -> int:
    if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
        raise RegistryError(f"{where}: {key} must be a positive integer, got {value!r}")
    return value


def _side(value: Any, key: str, where: str) -> int:
    side = _positive_int(value, key, where)
    if side > MAX_SIDE:
        raise RegistryError(f"{where}: {key} must be at most {MAX_SIDE}, got {side}")
    return side


def _text(value: Any, key: str, where: str) -> str:
    if not isinstance(value, str) or not value:
        raise RegistryError(f"{where}: {key} must be a non-empty string, got {value!r}")
    return value


def _optional_text(entry: dict[str, Any], key: str, where: str) -> str | None:
    value = entry.get(key)
    if value is not None and not isinstance(value, str):
        raise RegistryError(f"{where}: {key} must be a string, got {value!r}")
    return value


def _choice(value: Any, allowed: tuple[str, ...], key: str, where: str) -> str:
    text = str(value).upper() if key != "resize" else str(value)
    if text not in allowed:
        raise RegistryError(f"{where}: {key} must be one of {', '.join(allowed)}, "
                            f"got {value!r}")
    return text


def _triple(value: Any, key: str, where: str) -> tuple[float, float, float]:
    numbers = isinstance(value, list) and all(
        isinstance(item, (int, float)) and not isinstance(item, bool) for item in value)
    if not numbers or len(value) != 3:
        raise RegistryError(f"{where}: {key} must be a list of 3 numbers (0-255 units)")
    first, second, third = (float(item) for item in value)
    if not all(math.isfinite(item) for item in (first, second, third)):
        raise RegistryError(f"{where}: {key} values must be finite, got {value!r}")
    return (first, second, third)


def resolve_model(name: str, settings: Settings) -> ModelSpec:
    """The spec of one model with its file located, hashed and its effective version."""
    registry = _cached_registry(settings.models.registry_file)
    if name not in registry:
        known = ", ".join(sorted(registry))
        raise UnknownModel(f"unknown model {name!r}; the registry "
                           f"{settings.models.registry_file} declares: {known}")

    spec = registry[name]
    return with_file(spec, locate_file(spec, settings))


def with_file(spec: ModelSpec, path: Path) -> ModelSpec:
    """Bind a spec to a concrete file: sha256 and effective version follow from it."""
    digest = file_sha256(path)
    return replace(spec, path=path, file_sha256=digest,
                   version=effective_version(spec, digest))


def effective_version(spec: ModelSpec, digest: str) -> str:
    """Declared version plus 8 hex digits over the file hash and the preprocessing."""
    material = json.dumps({"sha256": digest, **spec.preprocessing()}, sort_keys=True)
    return f"{spec.declared_version}-{hashlib.sha256(material.encode()).hexdigest()[:8]}"


def locate_file(spec: ModelSpec, settings: Settings) -> Path:
    """Find the model file: cache, then search dirs, or inside an installed package."""
    source = spec.source
    if source.package:
        return _package_file(spec)

    candidates = candidate_paths(spec, settings)
    for candidate in candidates:
        if candidate.is_file():
            return candidate
    searched = ", ".join(str(path) for path in candidates)
    raise ModelUnavailable(f"model {spec.name}: file {source.file} not found "
                           f"(searched {searched}); {how_to_get(spec)}")


def candidate_paths(spec: ModelSpec, settings: Settings) -> list[Path]:
    """Where a `file` entry may live, in lookup order."""
    relative = Path(spec.source.file or spec.source.file_name).expanduser()
    if relative.is_absolute():
        return [relative]
    folders = [settings.models.cache_dir, *settings.models.search_dirs]
    return [Path(folder).expanduser() / relative for folder in folders]


def _package_file(spec: ModelSpec) -> Path:
    package = spec.source.package or ""
    try:
        found = importlib.util.find_spec(package)
    except (ImportError, ValueError):
        found = None
    if found is None or not found.submodule_search_locations:
        raise ModelUnavailable(f"model {spec.name}: Python package {package} is not "
                               f"installed; {how_to_get(spec)}")

    for folder in found.submodule_search_locations:
        candidate = Path(folder) / (spec.source.package_file or "")
        if candidate.is_file():
            return candidate
    raise ModelUnavailable(f"model {spec.name}: package {package} has no file "
                           f"{spec.source.package_file}; reinstall it")


def how_to_get(spec: ModelSpec) -> str:
    """One sentence telling a user how to obtain the model file."""
    source = spec.source
    if source.package:
        extra = f"imgsearch[{source.extra}]" if source.extra else source.package
        return f"install it with: pip install '{extra}'"
    ways = []
    if source.url:
        ways.append(f"`models fetch {spec.name}` (downloads and checks sha256)")
    if source.export:
        ways.append(f"`python -m common.models_cli export {spec.name}` (needs pip install 'imgsearch[export]')")
    if not ways:
        return "put the file in settings.models.cache_dir or a models.search_dirs folder"
    return "get it with " + " or ".join(ways)


_hash_cache: dict[tuple[str, int, int], str] = {}
_registry_cache: dict[tuple[str, int], dict[str, ModelSpec]] = {}
_cache_lock = threading.Lock()


def file_sha256(path: Path, chunk_bytes: int = 1 << 20) -> str:
    """sha256 of a file, cached by (path, size, mtime) since model files are large."""
    stat = path.stat()
    key = (str(path), stat.st_size, stat.st_mtime_ns)
    with _cache_lock:
        if key in _hash_cache:
            return _hash_cache[key]

    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        while chunk := handle.read(chunk_bytes):
            digest.update(chunk)
    with _cache_lock:
        _hash_cache[key] = digest.hexdigest()
    return digest.hexdigest()


def _cached_registry(path: Path) -> dict[str, ModelSpec]:
    try:
        key = (str(path), Path(path).stat().st_mtime_ns)
    except OSError as e:
        raise RegistryError(f"cannot read model registry {path}: {e}") from e
    with _cache_lock:
        if key not in _registry_cache:
            _registry_cache[key] = load_registry(Path(path))
        return _registry_cache[key]


def available_models(settings: Settings) -> list[ModelSpec]:
    """Enabled models whose file is present; missing ones are logged, not fatal."""
    specs = []
    for name in settings.models.enabled:
        try:
            specs.append(resolve_model(name, settings))
        except ModelUnavailable as e:
            log.warning("model_unavailable model=%s detail=%s", name, e)
    return specs


def check_version(spec: ModelSpec, found_version: str, where: str) -> None:
    """Refuse to mix vectors of two versions of one model (e.g. in one collection)."""
    if found_version != spec.version:
        raise VersionMismatch(f"model {spec.name}: {where} holds version {found_version} "
                              f"but the loaded model is version {spec.version}; "
                              f"re-index into a new collection")
