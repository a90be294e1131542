"""Small helpers the tests share (importable as ``helpers``: the tests folder is on the path)."""

from __future__ import annotations

import json
from pathlib import Path


def stage_status(folder: Path) -> str | None:
    """The status a stage folder's record says (``done`` / ``running``), or None without a record."""
    record = Path(folder) / "stage.json"
    return json.loads(record.read_text())["status"] if record.is_file() else None
