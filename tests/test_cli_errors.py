"""Command-line mistakes get one clear line and the documented exit code."""

from __future__ import annotations

import subprocess
import sys

from common.settings import PROJECT_ROOT


def _run(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", *args], cwd=PROJECT_ROOT, capture_output=True,
                          text=True, timeout=120)


def test_worker_status_names_an_unknown_model() -> None:
    run = _run("worker", "status", "--model", "no-such-model")

    assert run.returncode == 1
    assert run.stderr.strip() == (
        "error: unknown model no-such-model; the registry has efficientnet-lite0, "
        "resnet50, resnet50-nsfw, vgg16"
    )


def test_searcher_refuses_a_min_score_that_is_not_a_cosine() -> None:
    run = _run("searcher", "query.jpg", "--min-score", "2")

    assert run.returncode == 2
    assert "2.0 is not a cosine similarity (-1 to 1)" in run.stderr
    assert run.stdout == ""


def test_searcher_checks_the_html_folder_before_searching() -> None:
    run = _run("searcher", "query.jpg", "--html", "/no/such/folder/page.html")

    assert run.returncode == 2
    assert "--html: folder /no/such/folder does not exist" in run.stderr
