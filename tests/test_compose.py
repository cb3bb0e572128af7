"""The production compose file: parsed and checked for the shape the README promises.

CI has no Docker engine; where the docker client has the compose plugin, `.ci/run` also
runs `docker compose config`.
"""

from __future__ import annotations

import yaml

from common.settings import PROJECT_ROOT


def test_compose_has_the_production_shape() -> None:
    compose = yaml.safe_load((PROJECT_ROOT / "docker-compose.yml").read_text())
    services = compose["services"]

    workers = [name for name in services if name.startswith("worker-")]
    commands = {name: services[name]["command"] for name in workers}

    assert {"kafka", "etcd", "minio", "milvus", "redis", "producer"} <= set(services)
    assert commands == {
        "worker-efficientnet": ["worker", "--model", "efficientnet-lite0"],
        "worker-nsfw": ["worker", "--model", "resnet50-nsfw"],
    }
    assert all("container_name" not in services[name] for name in workers)
    assert "--appendonly" in services["redis"]["command"]
    assert services["producer"]["build"] == "."
    assert services["producer"]["environment"]["IMGSEARCH_MILVUS__URI"] == "http://milvus:19530"
