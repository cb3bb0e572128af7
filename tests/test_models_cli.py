"""The `models` command: list, fetch by url + sha256 from a loopback server, export guards."""

from __future__ import annotations

import hashlib
import importlib.util
import re
import threading
import time
from collections.abc import Callable, Iterator
from functools import partial
from http.server import BaseHTTPRequestHandler, SimpleHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import onnx
import pytest
from onnx import TensorProto, helper

from common.models_cli import main
from common.settings import DEFAULT_REGISTRY

ENTRY = """
[models.tiny]
version = "1"
file = "tiny.onnx"
url = "{url}"
sha256 = "{sha256}"
input = "x"
layout = "NCHW"
input_size = 8
resize_short = 8
channel_order = "RGB"
mean = [0.0, 0.0, 0.0]
std = [1.0, 1.0, 1.0]
output = "y"
dim = {dim}
"""


def _tiny_onnx(path: Path) -> bytes:
    """(N,3,8,8) -> spatial mean -> 'y' (N,3): a real, loadable 3-d embedding model."""
    graph = helper.make_graph(
        [helper.make_node("ReduceMean", ["x"], ["y"], axes=[2, 3], keepdims=0)], "tiny",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [None, 3, 8, 8])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [None, 3])],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)])
    model.ir_version = 8
    onnx.save(model, path)
    return path.read_bytes()


class _CountingHandler(SimpleHTTPRequestHandler):
    requests: list[str] = []

    def do_GET(self) -> None:
        type(self).requests.append(self.path)
        super().do_GET()

    def log_message(self, *args: object) -> None:
        pass


@pytest.fixture
def server(tmp_path: Path) -> Iterator[tuple[str, Path, list[str]]]:
    """A static file server on 127.0.0.1, stopped after the test."""
    root = tmp_path / "served"
    root.mkdir()
    handler = type("Handler", (_CountingHandler,), {"requests": []})
    httpd = ThreadingHTTPServer(("127.0.0.1", 0), partial(handler, directory=str(root)))
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{httpd.server_address[1]}", root, handler.requests
    httpd.shutdown()
    httpd.server_close()
    thread.join(timeout=5)


@pytest.fixture
def env(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """Point the command at a private cache; returns the cache dir."""
    cache = tmp_path / "cache"
    monkeypatch.setenv("IMGSEARCH_MODELS__CACHE_DIR", str(cache))
    monkeypatch.setenv("no_proxy", "127.0.0.1")
    monkeypatch.setenv("NO_PROXY", "127.0.0.1")
    return cache


def _registry(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, url: str, sha256: str,
              dim: int = 3) -> None:
    path = tmp_path / "models.toml"
    path.write_text(ENTRY.format(url=url, sha256=sha256, dim=dim))
    monkeypatch.setenv("IMGSEARCH_MODELS__REGISTRY_FILE", str(path))


def test_fetch_downloads_checks_hash_and_dim_then_reuses_the_cache(
    server, env: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    base, root, requests = server
    content = _tiny_onnx(root / "tiny.onnx")
    _registry(tmp_path, monkeypatch, f"{base}/tiny.onnx", hashlib.sha256(content).hexdigest())

    first = main(["fetch", "tiny"])
    second = main(["fetch", "tiny"])

    assert (first, second) == (0, 0)
    assert (env / "tiny.onnx").read_bytes() == content
    assert requests == ["/tiny.onnx"]  # the second call found it in the cache
    assert "tiny: ready at" in capsys.readouterr().out
    assert main(["list"]) == 0
    assert "tiny\tdisabled\tdim=3\tversion=1-" in capsys.readouterr().out


def test_fetch_rejects_a_bad_hash_and_installs_nothing(
    server, env: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    base, root, _ = server
    _tiny_onnx(root / "tiny.onnx")
    _registry(tmp_path, monkeypatch, f"{base}/tiny.onnx", "0" * 64)

    code = main(["fetch", "tiny"])

    assert code == 1
    assert "sha256 of" in capsys.readouterr().err
    assert not env.exists() or list(env.iterdir()) == []


def test_fetch_rejects_a_file_whose_dim_is_not_the_declared_one(
    server, env: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    base, root, _ = server
    content = _tiny_onnx(root / "tiny.onnx")
    _registry(tmp_path, monkeypatch, f"{base}/tiny.onnx", hashlib.sha256(content).hexdigest(),
              dim=5)

    code = main(["fetch", "tiny"])

    assert code == 1
    assert "has 3 values per image but the registry says dim=5" in capsys.readouterr().err
    assert list(env.iterdir()) == []


def test_fetch_of_a_missing_url_is_a_clear_failure(
    server, env: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    base, _, _ = server
    _registry(tmp_path, monkeypatch, f"{base}/absent.onnx", "0" * 64)

    assert main(["fetch", "tiny"]) == 1
    error = capsys.readouterr().err
    assert "download of" in error and "404" in error


def test_unknown_model_and_entries_without_url(
    env: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setenv("IMGSEARCH_MODELS__REGISTRY_FILE", str(DEFAULT_REGISTRY))

    assert main(["fetch", "nope"]) == 2
    assert "unknown model 'nope'" in capsys.readouterr().err
    assert main(["fetch", "vgg16"]) == 1
    assert "python -m common.models_cli export vgg16" in capsys.readouterr().err


@pytest.mark.skipif(importlib.util.find_spec("torch") is not None,
                    reason="torch is installed: export would really run")
@pytest.mark.parametrize("name", ["efficientnet-lite0", "vgg16", "resnet50"])
def test_export_without_torch_says_what_to_install(
    env: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str], name: str
) -> None:
    monkeypatch.setenv("IMGSEARCH_MODELS__REGISTRY_FILE", str(DEFAULT_REGISTRY))

    assert main(["export", name]) == 1
    error = capsys.readouterr().err
    assert f"`python -m common.models_cli export {name}` needs torch" in error
    assert "pip install 'imgsearch[export]'" in error
    assert not env.exists()


class _SlowHandler(BaseHTTPRequestHandler):
    """Declares `declared` bytes (None: no Content-Length) and sends `total` bytes in
    `step`-byte writes `pause_s` apart; gives up after 10 s or when the client leaves."""

    declared: int | None = None
    total = 0
    step = 1
    pause_s = 0.0

    def do_GET(self) -> None:
        self.send_response(200)
        if self.declared is not None:
            self.send_header("Content-Length", str(self.declared))
        self.end_headers()
        started, sent = time.monotonic(), 0
        try:
            while sent < self.total and time.monotonic() - started < 10:
                self.wfile.write(b"\0" * self.step)
                self.wfile.flush()
                sent += self.step
                time.sleep(self.pause_s)
        except OSError:
            pass  # the client hung up, as it should

    def log_message(self, *args: object) -> None:
        pass


@pytest.fixture
def slow_server() -> Iterator[Callable[..., str]]:
    """Start loopback servers of _SlowHandler with given attributes; returns their url."""
    servers: list[ThreadingHTTPServer] = []

    def start(**behaviour: object) -> str:
        handler = type("Slow", (_SlowHandler,), behaviour)
        httpd = ThreadingHTTPServer(("127.0.0.1", 0), handler)
        threading.Thread(target=httpd.serve_forever, daemon=True).start()
        servers.append(httpd)
        return f"http://127.0.0.1:{httpd.server_address[1]}/model.onnx"

    yield start
    for httpd in servers:
        httpd.shutdown()
        httpd.server_close()


@pytest.mark.timeout(30)
def test_fetch_from_a_trickling_server_stops_at_the_overall_deadline(
    slow_server, env: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    url = slow_server(declared=100_000, total=100_000, step=1, pause_s=0.05)
    _registry(tmp_path, monkeypatch, url, "0" * 64)
    monkeypatch.setenv("IMGSEARCH_MODELS__FETCH_TIMEOUT_S", "5")
    monkeypatch.setenv("IMGSEARCH_MODELS__FETCH_DEADLINE_S", "1")
    started = time.monotonic()

    code = main(["fetch", "tiny"])

    assert code == 1 and time.monotonic() - started < 3.0
    assert "download exceeds models.fetch_deadline_s=1" in capsys.readouterr().err
    assert list(env.iterdir()) == []


def test_fetch_refuses_a_declared_length_over_the_cap(
    server, env: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    base, root, requests = server
    content = _tiny_onnx(root / "tiny.onnx")
    _registry(tmp_path, monkeypatch, f"{base}/tiny.onnx", hashlib.sha256(content).hexdigest())
    monkeypatch.setenv("IMGSEARCH_MODELS__MAX_DOWNLOAD_BYTES", str(len(content) - 1))

    code = main(["fetch", "tiny"])

    assert code == 1 and requests == ["/tiny.onnx"]
    error = capsys.readouterr().err
    assert f"declares Content-Length {len(content)} bytes, over models.max_download_bytes=" \
           f"{len(content) - 1}" in error
    assert list(env.iterdir()) == []


@pytest.mark.timeout(30)
def test_fetch_stops_streaming_past_the_cap_without_content_length(
    slow_server, env: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    total = 64 * 1024 * 1024
    url = slow_server(declared=None, total=total, step=64 * 1024, pause_s=0.0)
    _registry(tmp_path, monkeypatch, url, "0" * 64)
    monkeypatch.setenv("IMGSEARCH_MODELS__MAX_DOWNLOAD_BYTES", "100000")

    code = main(["fetch", "tiny"])

    assert code == 1
    error = capsys.readouterr().err
    stopped = re.search(r"exceeds models.max_download_bytes=100000; stopped after (\d+)", error)
    assert stopped is not None, error
    assert 100_000 < int(stopped.group(1)) < total
    assert list(env.iterdir()) == []


@pytest.mark.parametrize("layout", ["cache_is_a_file", "file_in_the_path"])
def test_fetch_into_an_unusable_cache_dir_is_an_error_line(
    server, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str], layout: str,
) -> None:
    base, root, _ = server
    content = _tiny_onnx(root / "tiny.onnx")
    _registry(tmp_path, monkeypatch, f"{base}/tiny.onnx", hashlib.sha256(content).hexdigest())
    blocker = tmp_path / "blocker"
    blocker.write_text("a regular file")
    cache = blocker if layout == "cache_is_a_file" else blocker / "models"
    monkeypatch.setenv("IMGSEARCH_MODELS__CACHE_DIR", str(cache))
    monkeypatch.setenv("no_proxy", "127.0.0.1")

    code = main(["fetch", "tiny"])

    assert code == 1
    error = capsys.readouterr().err
    assert error.startswith("error: model cache ") and "not a usable directory" in error
    assert blocker.read_text() == "a regular file"
