"""flexkd.cache: one content-addressed cache entry (key, atomic build, manifest, verify, lock)."""

from __future__ import annotations

import hashlib
import json
import logging
import multiprocessing
import time
from pathlib import Path

import pytest

from flexkd.cache import MANIFEST_NAME, NOT_BUILT, adopt_entry, check_entry, entry_key, get_or_build
from flexkd.storage import atomic_write_bytes, atomic_write_json, content_hash


def _writer(calls: list, payload: bytes = b"hello cache"):
    def build(out: Path) -> dict:
        calls.append(out)
        (out / "data.bin").write_bytes(payload)
        (out / "sub").mkdir()
        (out / "sub" / "n.txt").write_text("42")
        return {"payload_bytes": len(payload)}

    return build


def _reader(path: Path) -> tuple[bytes, int]:
    return (path / "data.bin").read_bytes(), int((path / "sub" / "n.txt").read_text())


def test_miss_then_hit_with_manifest(tmp_path):
    calls: list = []
    key_obj = {"model": "m", "steps": 3}
    value, entry = get_or_build(tmp_path, "things", key_obj, _writer(calls), _reader, version=2)
    assert value == (b"hello cache", 42) and len(calls) == 1 and not entry.cache_hit
    assert entry.key == entry_key("things", key_obj, 2) == \
        content_hash({"kind": "things", "version": 2, "key": key_obj})
    assert entry.path == tmp_path / "things" / entry.key and entry.info == {"payload_bytes": 11}
    manifest = json.loads((entry.path / MANIFEST_NAME).read_text())
    assert manifest["key"] == entry.key and manifest["key_object"] == key_obj
    assert manifest["files"]["data.bin"] == {"size": 11,
                                             "sha256": hashlib.sha256(b"hello cache").hexdigest()}
    assert manifest["files"]["sub/n.txt"]["size"] == 2
    assert manifest["total_size"] == 13 and manifest["info"] == {"payload_bytes": 11}

    value2, entry2 = get_or_build(tmp_path, "things", {"steps": 3, "model": "m"}, _writer(calls),
                                  _reader, version=2)
    assert value2 == value and entry2.cache_hit and len(calls) == 1  # key order does not matter
    assert entry2.path == entry.path and entry2.info == {"payload_bytes": 11}
    # Every file is readable by others (a shared cache), not mkdtemp's 0700/0600.
    assert (entry.path.stat().st_mode & 0o777) == 0o755
    assert ((entry.path / "data.bin").stat().st_mode & 0o777) == 0o644


def test_different_key_object_or_version_is_another_entry(tmp_path):
    calls: list = []
    _, a = get_or_build(tmp_path, "things", {"x": 1}, _writer(calls), _reader)
    _, b = get_or_build(tmp_path, "things", {"x": 2}, _writer(calls), _reader)
    _, c = get_or_build(tmp_path, "things", {"x": 1}, _writer(calls), _reader, version=2)
    _, d = get_or_build(tmp_path, "others", {"x": 1}, _writer(calls), _reader)
    assert len({a.path, b.path, c.path, d.path}) == 4 and len(calls) == 4
    assert not any(e.cache_hit for e in (a, b, c, d))


@pytest.mark.parametrize("damage", ["truncate", "delete_file", "delete_manifest", "edit_manifest",
                                    "garbage_manifest"])
def test_damaged_entry_is_detected_and_rebuilt(tmp_path, caplog, damage):
    calls: list = []
    _, entry = get_or_build(tmp_path, "things", {"x": 1}, _writer(calls), _reader)
    data, manifest = entry.path / "data.bin", entry.path / MANIFEST_NAME
    if damage == "truncate":
        data.write_bytes(b"hello")
    elif damage == "delete_file":
        (entry.path / "sub" / "n.txt").unlink()
    elif damage == "delete_manifest":
        manifest.unlink()
    elif damage == "edit_manifest":
        m = json.loads(manifest.read_text())
        m["key"] = "0" * 16
        manifest.write_text(json.dumps(m))
    else:
        manifest.write_text("{not json")
    assert check_entry(entry.path, entry.key) is not None
    with caplog.at_level(logging.WARNING, logger="flexkd.cache"):
        value, again = get_or_build(tmp_path, "things", {"x": 1}, _writer(calls), _reader)
    assert "rebuilding" in caplog.text and str(entry.path) in caplog.text
    assert value == (b"hello cache", 42) and not again.cache_hit and len(calls) == 2
    assert check_entry(entry.path, entry.key, full=True) is None
    assert [p.name for p in (tmp_path / "things").iterdir() if not p.name.endswith(".lock")] == \
        [entry.key]


def test_same_size_corruption_needs_full_verify(tmp_path):
    calls: list = []
    _, entry = get_or_build(tmp_path, "things", {"x": 1}, _writer(calls), _reader)
    (entry.path / "data.bin").write_bytes(b"HELLO cache")  # same size
    assert check_entry(entry.path, entry.key) is None
    assert check_entry(entry.path, entry.key, full=True) == "data.bin has the wrong sha256"
    value, hit = get_or_build(tmp_path, "things", {"x": 1}, _writer(calls), _reader)
    assert hit.cache_hit and value[0] == b"HELLO cache"  # the cheap check does not re-hash
    value, rebuilt = get_or_build(tmp_path, "things", {"x": 1}, _writer(calls), _reader,
                                  full_verify=True)
    assert not rebuilt.cache_hit and value[0] == b"hello cache" and len(calls) == 2


def test_unloadable_entry_is_rebuilt(tmp_path, caplog):
    calls: list = []
    _, entry = get_or_build(tmp_path, "things", {"x": 1}, _writer(calls), _reader)
    seen = []

    def picky_load(path: Path):
        seen.append(path)
        if len(seen) <= 2:  # the first check and the re-check under the lock
            raise ValueError("cannot parse")
        return _reader(path)

    with caplog.at_level(logging.WARNING, logger="flexkd.cache"):
        value, again = get_or_build(tmp_path, "things", {"x": 1}, _writer(calls), picky_load)
    assert "does not load (ValueError: cannot parse)" in caplog.text
    assert value == (b"hello cache", 42) and not again.cache_hit and len(calls) == 2


def test_failed_build_leaves_no_entry(tmp_path):
    def broken(out: Path) -> dict:
        (out / "half.bin").write_bytes(b"x" * 100)
        raise RuntimeError("builder crashed")

    with pytest.raises(RuntimeError, match="builder crashed"):
        get_or_build(tmp_path, "things", {"x": 1}, broken, _reader)
    key = entry_key("things", {"x": 1})
    assert check_entry(tmp_path / "things" / key, key) == NOT_BUILT
    assert [p.name for p in (tmp_path / "things").iterdir()] == [f".{key}.lock"]
    calls: list = []
    value, entry = get_or_build(tmp_path, "things", {"x": 1}, _writer(calls), _reader)
    assert value == (b"hello cache", 42) and not entry.cache_hit


def test_named_entry_checks_its_key(tmp_path, caplog):
    calls: list = []
    _, entry = get_or_build(tmp_path, "assets", {"wheels": ["a==1"]}, _writer(calls), _reader,
                            name="my-asset")
    assert entry.path == tmp_path / "assets" / "my-asset"
    # Same folder, new recipe: the old entry is not trusted.
    with caplog.at_level(logging.WARNING, logger="flexkd.cache"):
        _, again = get_or_build(tmp_path, "assets", {"wheels": ["a==2"]}, _writer(calls),
                                _reader, name="my-asset")
    assert again.path == entry.path and again.key != entry.key and len(calls) == 2
    assert "built for another key" in caplog.text


def test_leftovers_of_a_killed_build_are_removed(tmp_path):
    key = entry_key("things", {"x": 1})
    stale = tmp_path / "things" / f".{key}.abcd_123.tmp"
    other = tmp_path / "things" / f".{key}x.abcd_123.tmp"  # another entry's build: untouched
    stale.mkdir(parents=True)
    other.mkdir()
    get_or_build(tmp_path, "things", {"x": 1}, _writer([]), _reader)
    assert not stale.exists() and other.exists()


def test_adopt_an_entry_of_an_older_layout(tmp_path):
    calls: list = []
    _, entry = get_or_build(tmp_path, "things", {"x": 1}, _writer(calls), _reader)
    files = json.loads((entry.path / MANIFEST_NAME).read_text())["files"]
    (entry.path / MANIFEST_NAME).unlink()  # what an older layout looks like
    wrong = {**files, "data.bin": {"size": 99, "sha256": files["data.bin"]["sha256"]}}
    assert not adopt_entry(tmp_path, "things", {"x": 1}, wrong)
    assert check_entry(entry.path, entry.key) is not None
    assert adopt_entry(tmp_path, "things", {"x": 1}, files, info={"from": "old layout"})
    assert check_entry(entry.path, entry.key, full=True) is None
    value, hit = get_or_build(tmp_path, "things", {"x": 1}, _writer(calls), _reader)
    assert hit.cache_hit and hit.info == {"from": "old layout"} and len(calls) == 1


def _build_in_process(root: str, barrier, counter: str) -> None:
    def build(out: Path) -> dict:
        with open(counter, "a") as f:
            f.write("built\n")
        time.sleep(0.5)  # hold the lock while the other process arrives
        (out / "data.bin").write_bytes(b"from one process")
        return {}

    barrier.wait()
    value, _ = get_or_build(root, "things", {"shared": True}, build,
                            lambda p: (p / "data.bin").read_bytes())
    assert value == b"from one process"


def test_two_processes_build_an_entry_once(tmp_path):
    ctx = multiprocessing.get_context("spawn")  # fork of a threaded xdist worker can deadlock
    barrier = ctx.Barrier(2)
    counter = tmp_path / "calls.txt"
    procs = [ctx.Process(target=_build_in_process, args=(str(tmp_path / "cache"), barrier, str(counter)))
             for _ in range(2)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(60)
    assert [p.exitcode for p in procs] == [0, 0]
    assert counter.read_text() == "built\n"


def test_atomic_writes_get_the_mode_of_a_plain_open(tmp_path):
    # mkstemp makes its file 0600: results and plots written through it were unreadable to
    # anyone else on a shared machine.
    plain = tmp_path / "plain.json"
    plain.write_text("{}")
    atomic_write_json(tmp_path / "results.json", {"accuracy": 0.5})
    atomic_write_bytes(tmp_path / "plot.png", b"\x89PNG")
    for name in ("results.json", "plot.png"):
        assert (tmp_path / name).stat().st_mode & 0o777 == plain.stat().st_mode & 0o777
    assert json.loads((tmp_path / "results.json").read_text()) == {"accuracy": 0.5}
