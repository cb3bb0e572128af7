"""Apache Kafka's jars from Maven Central, resolved by Maven into a cache folder, run on Java 17+."""

from __future__ import annotations

import logging
import os
import re
import shutil
import subprocess
import uuid
from pathlib import Path

from common.errors import ImgSearchError

log = logging.getLogger(__name__)

CACHE_ROOT = Path(os.environ.get("IMGSEARCH_CACHE_DIR", Path.home() / ".cache" / "imgsearch"))
POM_TEMPLATE = Path(__file__).resolve().parent / "kafka-pom.xml"
MIN_JAVA = 17


class KafkaDistError(ImgSearchError):
    """Java or the Kafka jars are missing or unusable."""


def java_binary() -> str:
    """The java to run Kafka with: JAVA_HOME's, else the one on PATH; must be 17 or newer."""
    home = os.environ.get("JAVA_HOME")
    java = str(Path(home) / "bin" / "java") if home else shutil.which("java")
    if not java or not Path(java).exists():
        raise KafkaDistError(f"Java {MIN_JAVA} not found: install openjdk-{MIN_JAVA}-jre-headless")
    version = _java_major(java)
    if version < MIN_JAVA:
        raise KafkaDistError(f"Java {MIN_JAVA} not found: {java} is Java {version}")
    return java


def _java_major(java: str) -> int:
    printed = subprocess.run(
        [java, "-version"], capture_output=True, text=True, check=False
    ).stderr
    match = re.search(r'version "(\d+)(?:\.(\d+))?', printed)
    if not match:
        raise KafkaDistError(f"cannot tell the version of {java}: {printed.strip()[:200]}")
    major = int(match.group(1))
    return int(match.group(2)) if major == 1 else major


def libs_dir(version: str) -> Path:
    return CACHE_ROOT / f"kafka-{version}" / "libs"


def ensure_libs(version: str) -> Path:
    """Resolve kafka_2.13 and its runtime dependencies with Maven, once per version."""
    target = libs_dir(version)
    marker = target / ".complete"
    if marker.exists():
        return target
    mvn = shutil.which("mvn")
    if not mvn:
        raise KafkaDistError("Maven (mvn) not found: install the maven package to fetch Kafka")
    work = target.parent
    work.mkdir(parents=True, exist_ok=True)
    (work / "pom.xml").write_text(POM_TEMPLATE.read_text().replace("@KAFKA_VERSION@", version))
    log.info("resolving Apache Kafka %s jars with Maven into %s", version, target)
    result = subprocess.run(
        [mvn, "-B", "-q", f"-Dmaven.repo.local={CACHE_ROOT / 'm2'}", "-f", str(work / "pom.xml"),
         "dependency:copy-dependencies", f"-DoutputDirectory={target}",
         "-DincludeScope=runtime"],
        capture_output=True, text=True, check=False,
    )
    if result.returncode != 0:
        tail = (result.stdout + result.stderr).strip().splitlines()[-5:]
        raise KafkaDistError(f"Maven could not fetch Kafka {version}: " + " | ".join(tail))
    marker.write_text(version)
    return target


def format_storage(java: str, libs: Path, properties: Path) -> None:
    """Format a fresh KRaft log folder as a standalone controller (first start only)."""
    cluster_id = _cluster_id()
    result = subprocess.run(
        [java, "-cp", f"{libs}/*", "kafka.tools.StorageTool", "format",
         "-t", cluster_id, "-c", str(properties), "--standalone"],
        capture_output=True, text=True, check=False,
    )
    if result.returncode != 0:
        raise KafkaDistError(f"kafka storage format failed: {result.stdout}{result.stderr}"[:600])
    log.info("kafka storage formatted cluster_id=%s", cluster_id)


def _cluster_id() -> str:
    """Kafka's cluster id format: a UUID as 22 characters of URL-safe base64."""
    import base64

    return base64.urlsafe_b64encode(uuid.uuid4().bytes).decode().rstrip("=")
