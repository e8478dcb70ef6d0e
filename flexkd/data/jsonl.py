"""Reading JSON Lines task files with errors that name the file and line."""

from __future__ import annotations

import json
from pathlib import Path

from flexkd.errors import DataFileError


def read_jsonl(path: str | Path, required: tuple[str, ...] = ()) -> list[dict]:
    path = Path(path)
    if not path.is_file():
        raise DataFileError(f"data file not found: {path} (check the task's data_dir, or "
                            "materialise the dataset with `python -m flexkd.assets`)")
    rows = []
    with open(path, encoding="utf-8") as f:
        for lineno, line in enumerate(f, start=1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as e:
                raise DataFileError(f"{path}:{lineno}: not valid JSON ({e.msg})") from None
            if not isinstance(row, dict):
                raise DataFileError(f"{path}:{lineno}: expected a JSON object, got {type(row).__name__}")
            missing = [k for k in required if k not in row]
            if missing:
                raise DataFileError(f"{path}:{lineno}: missing field(s) {missing}; "
                                    f"rows of this task need {list(required)}")
            row["_line"] = lineno
            rows.append(row)
    if not rows:
        raise DataFileError(f"{path}: the split is empty")
    return rows
