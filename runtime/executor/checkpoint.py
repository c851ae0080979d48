"""The safetensors files of a model directory (read by the loader and by the stage planner)."""

from __future__ import annotations

import json
from pathlib import Path


def weight_files(path: Path) -> list[Path]:
    index = path / "model.safetensors.index.json"
    if index.is_file():
        names = sorted(set(json.loads(index.read_text())["weight_map"].values()))
        return [path / name for name in names]
    return sorted(path.glob("*.safetensors"))
