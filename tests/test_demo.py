"""The README's main job, end to end on 40 real photographs (10 UKBench groups).

Runs `python -m demo` as a user would (producer and workers as separate processes, the
searcher CLI for the queries), then scores retrieval through the Python API.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from common.settings import PROJECT_ROOT, Settings
from demo import photos
from demo.evaluate import collect_rankings
from demo.metrics import score_rankings
from demo.pipeline import child_env, indexed_counts
from conftest import EFFICIENTNET, UKBENCH, require

MODELS = ["efficientnet-lite0", "resnet50-nsfw"]


@pytest.mark.slow
def test_main_job_indexes_and_finds_group_mates(
    settings: Settings, cleanup_services: None, tmp_path: Path
) -> None:
    require(EFFICIENTNET, "efficientnet-lite0 model")
    require(UKBENCH, "UKBench photographs")
    html = tmp_path / "results.html"
    env = child_env(settings)

    run = subprocess.run(
        [sys.executable, "-m", "demo", str(UKBENCH), "--limit", "40", "--html", str(html),
         "--timeout", "300"],
        env=env, cwd=PROJECT_ROOT, capture_output=True, text=True, timeout=420,
    )
    copied = sorted((settings.watch.roots[0] / "ukbench").glob("*.jpg"))
    counts = indexed_counts(settings, MODELS, [str(p) for p in copied])
    rankings = collect_rankings(settings, copied, MODELS)
    groups = photos.read_groundtruth(UKBENCH / "groundtruth.csv")

    assert run.returncode == 0, run.stdout[-2000:] + run.stderr[-3000:]
    assert len(copied) == 40
    assert counts == {"efficientnet-lite0": 40, "resnet50-nsfw": 40}
    assert html.read_text().count("<img") >= 4
    for model in MODELS:
        assert score_rankings(rankings[model], groups).ukbench >= 3.5, model
