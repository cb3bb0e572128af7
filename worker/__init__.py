"""Workers: one Kafka consumer group per model keeps that model's Milvus collection current."""

from __future__ import annotations

from typing import Any

__all__ = ["Worker", "WorkerTimeout", "WorkerTotals"]


def __getattr__(name: str) -> Any:
    """Lazy, so `python -m worker status` does not load ONNX Runtime."""
    if name in __all__:
        from worker import runner

        return getattr(runner, name)
    raise AttributeError(name)
