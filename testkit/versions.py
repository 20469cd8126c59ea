"""Version records for the registry's tests."""

from __future__ import annotations

from ale_backend.registry import VersionInfo


def version_info(version: str, project: int = 3, promoted: bool = True,
                 created: str = "2026-11-26T10:00:00+00:00") -> VersionInfo:
    """A version's record with small made-up figures; ``created`` orders versions."""
    return VersionInfo(version=version, project=project, parent="base", class_names=["a"],
                       metrics={"map50_95": 0.5}, annotations=4, boxes=9, created_at=created, train_seconds=1.0,
                       promoted=promoted)
