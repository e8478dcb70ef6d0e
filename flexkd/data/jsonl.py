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
    # Bytes, decoded line by line, so a bad byte is reported at its own line.
    with open(path, "rb") as f:
        for lineno, raw in enumerate(f, start=1):
            try:
                line = raw.decode("utf-8-sig" if lineno == 1 else "utf-8")
            except UnicodeDecodeError as e:
                raise DataFileError(f"{path}:{lineno}: not UTF-8 text (byte {raw[e.start]:#04x} "
                                    f"at column {e.start + 1}); save the file as UTF-8") from None
            if not line.strip():
                continue
            try:
                row = json.loads(line.rstrip("\r\n"))
            except json.JSONDecodeError as e:
                raise DataFileError(f"{path}:{lineno}: not valid JSON ({e.msg} at column "
                                    f"{e.colno}); each line must be one JSON object") from None
            if not isinstance(row, dict):
                raise DataFileError(f"{path}:{lineno}: expected a JSON object, got "
                                    f"{type(row).__name__}; each line must be one JSON object "
                                    f"with {list(required) or 'the task fields'}")
            missing = [k for k in required if k not in row]
            if missing:
                raise DataFileError(f"{path}:{lineno}: missing field(s) {missing}; "
                                    f"rows of this task need {list(required)}")
            row["_line"] = lineno
            rows.append(row)
    if not rows:
        raise DataFileError(f"{path}: the split is empty (no rows); every task needs rows in "
                            "train.jsonl, validation.jsonl and test.jsonl")
    return rows
