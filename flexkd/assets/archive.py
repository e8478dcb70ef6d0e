"""Reading wheels (zip archives): safe extraction of a folder, single members, progress bars."""

from __future__ import annotations

import re
import zipfile
from pathlib import Path, PurePosixPath

from tqdm.auto import tqdm

# Files in the source archives that are nobody's business (Windows folder settings, git).
JUNK_FILES = frozenset({"desktop.ini", "thumbs.db", ".ds_store", ".gitattributes"})


def progress_bar(progress: bool, **kwargs) -> tqdm:
    return tqdm(disable=not progress, leave=False, dynamic_ncols=True, **kwargs)


def copy_stream(src, dst, bar: tqdm, chunk: int = 1 << 20) -> None:
    while block := src.read(chunk):
        dst.write(block)
        bar.update(len(block))


def safe_relpath(member: str, strip: str) -> PurePosixPath | None:
    """`member` relative to folder `strip` inside an archive, or None if outside it/junk."""
    path = PurePosixPath(member)
    prefix = PurePosixPath(strip)
    if member.endswith("/") or prefix not in path.parents:
        return None
    rel = path.relative_to(prefix)
    if any(part in ("..", "") for part in rel.parts) or rel.is_absolute():
        raise RuntimeError(f"refusing archive member with an unsafe path: {member!r}")
    if rel.name.lower() in JUNK_FILES:
        return None
    return rel


def extract_folder(zf: zipfile.ZipFile, folder: str, out: Path, progress: bool,
                   desc: str) -> list[str]:
    """Extract every file under `folder` in the archive into `out` (prefix stripped)."""
    members = [(info, rel) for info in zf.infolist()
               if (rel := safe_relpath(info.filename, folder)) is not None]
    if not members:
        raise RuntimeError(f"{zf.filename}: nothing found under {folder}/")
    total = sum(info.file_size for info, _ in members)
    with progress_bar(progress, total=total, unit="B", unit_scale=True, desc=desc) as bar:
        for info, rel in members:
            target = out.joinpath(*rel.parts)
            target.parent.mkdir(parents=True, exist_ok=True)
            with zf.open(info) as src, open(target, "wb") as dst:
                copy_stream(src, dst, bar)
    return sorted(str(rel) for _, rel in members)


def single_member(zf: zipfile.ZipFile, pattern: str) -> zipfile.ZipInfo:
    hits = [i for i in zf.infolist() if re.search(pattern, i.filename)]
    if len(hits) != 1:
        raise RuntimeError(f"{zf.filename}: expected one member matching {pattern!r}, "
                           f"found {[i.filename for i in hits]}")
    return hits[0]


def model_folder(names: list[str]) -> str:
    """The folder of an archive holding config.json next to the weights."""
    folders = {str(PurePosixPath(n).parent) for n in names if PurePosixPath(n).name == "config.json"}
    weights = {str(PurePosixPath(n).parent) for n in names
               if PurePosixPath(n).name in ("model.safetensors", "pytorch_model.bin")}
    both = sorted(folders & weights)
    if len(both) != 1:
        raise RuntimeError(f"expected one folder with config.json and weights, found {both}")
    return both[0]
