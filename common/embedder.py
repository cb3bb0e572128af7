"""Batched ONNX Runtime embedder: one session per model per process, L2-normalised vectors.

Input layout, geometry and scaling come from the registry spec; the session is checked
against them at load so a wrong registry entry fails at start, not on the first image.
"""

from __future__ import annotations

import logging
import threading
import time
from collections import deque
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import Future, ThreadPoolExecutor

import numpy as np
import onnx
import onnxruntime as ort
from numpy.typing import NDArray
from PIL import Image

from common.errors import ImgSearchError
from common.images import DecodeError, decode_image, to_rgb
from common.registry import ModelSpec, resolve_model
from common.settings import Settings

log = logging.getLogger(__name__)

DEFAULT_MAX_BATCH = 32
_NORM_FLOOR = 1e-12


class ModelLoadError(ImgSearchError):
    """A model file does not match its registry entry (layout, tensor names, dim)."""


class Embedder:
    """Turns images into unit-length float32 vectors with one ONNX Runtime session."""

    def __init__(self, spec: ModelSpec, *, intra_op_threads: int = 0,
                 max_batch: int = DEFAULT_MAX_BATCH) -> None:
        if spec.path is None:
            raise ModelLoadError(f"model {spec.name}: spec has no file; use resolve_model")
        self.spec = spec
        self.dim = spec.dim
        self.max_batch = max(1, max_batch)
        self.images_embedded = 0
        self._count_lock = threading.Lock()
        self._mean = np.asarray(spec.mean, dtype=np.float32)
        self._std = np.asarray(spec.std, dtype=np.float32)
        self.input_shape = _input_shape(spec)

        started = time.monotonic()
        self._session = _open_session(spec, intra_op_threads)
        _check_input(self._session, spec)
        self._probe()
        log.info("model_loaded model=%s version=%s dim=%d layout=%s threads=%d "
                 "duration_ms=%.0f", spec.name, spec.version, spec.dim, spec.layout,
                 intra_op_threads, (time.monotonic() - started) * 1000)

    def preprocess(self, image: Image.Image) -> NDArray[np.float32]:
        """Resize, centre-crop, reorder channels and scale: one input, no batch dim."""
        rgb = image if image.mode == "RGB" else to_rgb(image)
        cropped = resize_and_crop(rgb, self.spec)

        pixels = np.asarray(cropped, dtype=np.float32)
        if self.spec.channel_order == "BGR":
            pixels = pixels[:, :, ::-1]
        pixels = (pixels - self._mean) / self._std

        if self.spec.layout == "NCHW":
            pixels = pixels.transpose(2, 0, 1)
        return np.ascontiguousarray(pixels, dtype=np.float32)

    def embed_arrays(self, batch: NDArray[np.float32]) -> NDArray[np.float32]:
        """(n, dim) unit vectors for a preprocessed batch of any size."""
        batch = self._checked_batch(batch)
        chunks = [self._run(batch[start:start + self.max_batch], self.spec.output)
                  for start in range(0, len(batch), self.max_batch)]
        if not chunks:
            return np.zeros((0, self.dim), dtype=np.float32)
        return l2_normalise(np.concatenate(chunks))

    def logits(self, batch: NDArray[np.float32]) -> NDArray[np.float32]:
        """Raw class scores, for the golden-class checks of models that declare them."""
        if not self.spec.logits:
            raise ModelLoadError(f"model {self.spec.name} declares no logits output")
        return self._run(self._checked_batch(batch), self.spec.logits)

    def embed_images(self, images: Sequence[Image.Image]) -> NDArray[np.float32]:
        """(n, dim) unit vectors for decoded images."""
        if not images:
            return np.zeros((0, self.dim), dtype=np.float32)
        return self.embed_arrays(np.stack([self.preprocess(image) for image in images]))

    def embed_files(
        self, paths: Sequence[str], *, max_pixels: int,
        pool: ThreadPoolExecutor | None = None,
    ) -> list[NDArray[np.float32] | DecodeError]:
        """A vector or a DecodeError per path, in order; never raises for a bad file.

        Decoding and preprocessing run in the pool; while one batch is in the model the
        next ones are being decoded. At most two batches are held in memory.
        """
        own_pool = pool is None
        workers = pool or ThreadPoolExecutor(max_workers=2, thread_name_prefix="decode")
        try:
            return self._embed_pipelined(paths, max_pixels, workers)
        finally:
            if own_pool:
                workers.shutdown(wait=True)

    def _embed_pipelined(
        self, paths: Sequence[str], max_pixels: int, pool: ThreadPoolExecutor
    ) -> list[NDArray[np.float32] | DecodeError]:
        results: list[NDArray[np.float32] | DecodeError | None] = [None] * len(paths)
        pending: deque[tuple[int, Future]] = deque()
        queued = iter(enumerate(paths))
        _submit(pending, queued, 2 * self.max_batch, pool, self._load, max_pixels)

        while pending:
            batch = [pending.popleft() for _ in range(min(self.max_batch, len(pending)))]
            _submit(pending, queued, self.max_batch, pool, self._load, max_pixels)
            self._embed_ready(batch, results)
        return [_filled(result) for result in results]

    def _load(self, path: str, max_pixels: int) -> NDArray[np.float32] | DecodeError:
        try:
            image = decode_image(path, max_pixels=max_pixels, min_side=self.spec.resize_short)
            return self.preprocess(image)
        except DecodeError as error:
            return error
        except Exception as e:  # a bad file must never stop the batch
            error = DecodeError("corrupt", f"{path}: {type(e).__name__}: {e}")
            error.__cause__ = e
            return error

    def _embed_ready(
        self, batch: list[tuple[int, Future]],
        results: list[NDArray[np.float32] | DecodeError | None],
    ) -> None:
        arrays: list[tuple[int, NDArray[np.float32]]] = []
        for index, future in batch:
            outcome = future.result()
            if isinstance(outcome, DecodeError):
                results[index] = outcome
            else:
                arrays.append((index, outcome))
        if not arrays:
            return

        vectors = self.embed_arrays(np.stack([array for _, array in arrays]))
        for (index, _), vector in zip(arrays, vectors):
            results[index] = vector

    def _checked_batch(self, batch: NDArray[np.float32]) -> NDArray[np.float32]:
        if batch.ndim != 4 or tuple(batch.shape[1:]) != self.input_shape:
            raise ValueError(f"model {self.spec.name}: batch shape {batch.shape} does not "
                             f"match (n, {', '.join(map(str, self.input_shape))})")
        return np.ascontiguousarray(batch, dtype=np.float32)

    def _run(self, batch: NDArray[np.float32], output: str) -> NDArray[np.float32]:
        (values,) = self._session.run([output], {self.spec.input_name: batch})
        with self._count_lock:
            self.images_embedded += len(batch)
        return np.asarray(values, dtype=np.float32).reshape(len(batch), -1)

    def _probe(self) -> None:
        """One zero input proves the layout and the embedding dim before any real image."""
        zeros = np.zeros((1, *self.input_shape), dtype=np.float32)
        try:
            (values,) = self._session.run([self.spec.output], {self.spec.input_name: zeros})
        except Exception as e:  # onnxruntime raises its own untyped errors
            raise ModelLoadError(f"model {self.spec.name}: a {self.spec.layout} input of "
                                 f"shape {zeros.shape} fails in {self.spec.path}: {e}") from e
        found = int(np.asarray(values).size)
        if found != self.dim:
            raise ModelLoadError(f"model {self.spec.name}: output {self.spec.output!r} has "
                                 f"{found} values per image but the registry says dim="
                                 f"{self.dim}")


def l2_normalise(vectors: NDArray[np.float32]) -> NDArray[np.float32]:
    """Rows scaled to unit length (an all-zero row stays zero)."""
    norms = np.linalg.norm(vectors, axis=1, keepdims=True)
    return (vectors / np.maximum(norms, _NORM_FLOOR)).astype(np.float32)


def _input_shape(spec: ModelSpec) -> tuple[int, int, int]:
    size = spec.input_size
    return (3, size, size) if spec.layout == "NCHW" else (size, size, 3)


def resize_and_crop(image: Image.Image, spec: ModelSpec) -> Image.Image:
    """The centre crop of the resized image, resampled in one step from its source box.

    Same pixels as resizing the whole image then cropping, but only the crop is ever
    allocated: a 1x100000 strip would otherwise be resized to 256x25,600,000 first.
    """
    resized = _resized_size(image.size, spec)
    left, top = ((side - spec.input_size) // 2 for side in resized)
    if resized == image.size:
        return image.crop((left, top, left + spec.input_size, top + spec.input_size))

    scale_x = image.width / resized[0]
    scale_y = image.height / resized[1]
    box = (left * scale_x, top * scale_y, (left + spec.input_size) * scale_x,
           (top + spec.input_size) * scale_y)
    return image.resize((spec.input_size, spec.input_size), Image.Resampling.BILINEAR,
                        box=box)


def _resized_size(size: tuple[int, int], spec: ModelSpec) -> tuple[int, int]:
    """The (width, height) the registry geometry resizes an image to, before the crop."""
    target = spec.resize_short
    width, height = size
    if spec.resize == "square":
        return (target, target)
    if width <= height:
        return (target, max(target, round(height * target / width)))
    return (max(target, round(width * target / height)), target)


def _filled(
    result: NDArray[np.float32] | DecodeError | None,
) -> NDArray[np.float32] | DecodeError:
    if result is None:
        raise RuntimeError("embed_files left a path without a result")
    return result


def _submit(pending: deque[tuple[int, Future]], queued: Iterator[tuple[int, str]],
            limit: int, pool: ThreadPoolExecutor,
            load: Callable[[str, int], NDArray[np.float32] | DecodeError],
            max_pixels: int) -> None:
    for _ in range(limit):
        item = next(queued, None)
        if item is None:
            return
        index, path = item
        pending.append((index, pool.submit(load, path, max_pixels)))


def _open_session(spec: ModelSpec, intra_op_threads: int) -> ort.InferenceSession:
    options = ort.SessionOptions()
    if intra_op_threads > 0:
        options.intra_op_num_threads = intra_op_threads
    options.inter_op_num_threads = 1
    try:
        return ort.InferenceSession(_graph_with_outputs(spec), sess_options=options,
                                    providers=["CPUExecutionProvider"])
    except ModelLoadError:
        raise
    except Exception as e:
        raise ModelLoadError(f"model {spec.name}: onnxruntime cannot load {spec.path}: "
                             f"{e}") from e


def _graph_with_outputs(spec: ModelSpec) -> str | bytes:
    """The model path, or the serialised graph with the embedding tensor made an output."""
    wanted = [name for name in (spec.output, spec.logits) if name]
    try:
        model = onnx.load(str(spec.path))
    except Exception as e:
        raise ModelLoadError(f"model {spec.name}: {spec.path} is not an ONNX model: "
                             f"{e}") from e

    outputs = {output.name for output in model.graph.output}
    missing = [name for name in wanted if name not in outputs]
    if not missing:
        return str(spec.path)

    produced = {name for node in model.graph.node for name in node.output}
    for name in missing:
        if name not in produced:
            raise ModelLoadError(f"model {spec.name}: tensor {name!r} is not in the graph "
                                 f"of {spec.path} (outputs: {', '.join(sorted(outputs))})")
        model.graph.output.append(
            onnx.helper.make_tensor_value_info(name, onnx.TensorProto.FLOAT, None))
    log.info("model_output_exposed model=%s tensors=%s", spec.name, ",".join(missing))
    return model.SerializeToString()


def _check_input(session: ort.InferenceSession, spec: ModelSpec) -> None:
    """Cross-check the registry's input name, layout and size with the declared shape."""
    inputs = {node.name: node for node in session.get_inputs()}
    if spec.input_name not in inputs:
        raise ModelLoadError(f"model {spec.name}: no input {spec.input_name!r}; the model "
                             f"has {', '.join(inputs)}")

    node = inputs[spec.input_name]
    shape = list(node.shape)
    expected = [None, *_input_shape(spec)]
    clash = len(shape) != 4 or any(
        isinstance(got, int) and want is not None and got != want
        for got, want in zip(shape, expected)
    )
    if clash:
        raise ModelLoadError(f"model {spec.name}: registry says {spec.layout} "
                             f"{spec.input_size}x{spec.input_size}, i.e. shape "
                             f"(batch, {', '.join(map(str, expected[1:]))}), but input "
                             f"{node.name!r} is declared {shape}; fix layout/input_size")
    if node.type != "tensor(float)":
        raise ModelLoadError(f"model {spec.name}: input {node.name!r} is {node.type}, "
                             f"expected tensor(float)")


_embedders: dict[tuple[str, str, str], Embedder] = {}
_embedders_lock = threading.Lock()


def get_embedder(name: str, settings: Settings) -> Embedder:
    """The process-wide embedder of a model: its session is created once, then reused."""
    spec = resolve_model(name, settings)
    key = (spec.name, spec.version, str(spec.path))
    with _embedders_lock:
        if key not in _embedders:
            _embedders[key] = Embedder(
                spec, intra_op_threads=settings.models.intra_op_threads,
                max_batch=settings.models.max_batch,
            )
        return _embedders[key]
