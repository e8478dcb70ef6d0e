"""The committed tiny fixtures: reproducible, well-formed, tokenizable, and learnable."""

from __future__ import annotations

import json
import random
from pathlib import Path

import pytest

from flexkd.data.tasks import SPLITS
from flexkd.fixtures import FIXTURE_NAMES, FIXTURES_DIR, fixture_path
from flexkd.fixtures import build as fixture_build

CLS_SIZES = {"train": 512, "validation": 128, "test": 128}
INSTRUCT_SIZES = {"train": 512, "validation": 64, "test": 64}
SPECIALS = {
    "pad_token": "[PAD]",
    "unk_token": "[UNK]",
    "cls_token": "[CLS]",
    "sep_token": "[SEP]",
    "mask_token": "[MASK]",
    "bos_token": "<s>",
    "eos_token": "</s>",
}


def read_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()]


def load_splits(name: str) -> dict[str, list[dict]]:
    return {s: read_jsonl(fixture_path(name) / f"{s}.jsonl") for s in SPLITS}


def tree_bytes(root: Path) -> dict[str, bytes]:
    """{relative path: bytes} of every file under root."""
    return {p.relative_to(root).as_posix(): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def tree_differences(a: Path, b: Path) -> list[str]:
    fa, fb = tree_bytes(a), tree_bytes(b)
    diffs = [f"only in {a}: {n}" for n in sorted(fa.keys() - fb.keys())]
    diffs += [f"only in {b}: {n}" for n in sorted(fb.keys() - fa.keys())]
    diffs += [f"differs: {n}" for n in sorted(fa.keys() & fb.keys()) if fa[n] != fb[n]]
    return diffs


@pytest.fixture(scope="module")
def tokenizer():
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(fixture_path("tiny_tokenizer")))


# ------------------------------------------------------------------------ reproducibility


@pytest.fixture(scope="module")
def rebuilt(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("fixtures-rebuild")
    built = fixture_build.build(out)
    assert set(built) == set(FIXTURE_NAMES)
    return out


@pytest.mark.parametrize("name", FIXTURE_NAMES)
def test_builder_reproduces_committed_files_byte_for_byte(rebuilt, name):
    diffs = tree_differences(rebuilt / name, FIXTURES_DIR / name)
    assert not diffs, (
        f"committed {name} is not what flexkd.fixtures.build generates; rerun "
        f"`python -m flexkd.fixtures.build` and commit the result: {diffs}"
    )


def test_tree_comparison_notices_a_changed_byte(rebuilt, tmp_path):
    """The reproducibility check above can fail: one flipped label is caught."""
    import shutil

    copy = tmp_path / "tiny_cls"
    shutil.copytree(rebuilt / "tiny_cls", copy)
    text = (copy / "test.jsonl").read_text()
    (copy / "test.jsonl").write_text(text.replace('"label": 0', '"label": 1', 1))
    assert tree_differences(copy, rebuilt / "tiny_cls") == ["differs: test.jsonl"]


def test_build_replaces_stale_files(tmp_path):
    (tmp_path / "tiny_cls").mkdir()
    (tmp_path / "tiny_cls" / "stale.jsonl").write_text("old\n")
    (tmp_path / "unrelated.txt").write_text("keep\n")
    fixture_build.build(tmp_path)
    assert not (tmp_path / "tiny_cls" / "stale.jsonl").exists()
    assert (tmp_path / "unrelated.txt").read_text() == "keep\n"
    assert not tree_differences(tmp_path / "tiny_cls", FIXTURES_DIR / "tiny_cls")


def test_fixtures_folder_is_small():
    total = sum(p.stat().st_size for p in FIXTURES_DIR.rglob("*") if p.is_file())
    assert total < 512 * 1024, total


# ---------------------------------------------------------------------------- fixture_path


def test_fixture_path_known_names():
    for name in FIXTURE_NAMES:
        assert fixture_path(name) == FIXTURES_DIR / name
        assert fixture_path(name).is_dir()
    assert FIXTURES_DIR == Path(fixture_build.__file__).resolve().parent


@pytest.mark.parametrize("name", ["tiny_nope", "", "../fixtures", "tiny_cls/train.jsonl"])
def test_fixture_path_unknown_name_is_a_clear_error(name):
    with pytest.raises(FileNotFoundError, match="unknown fixture .*available fixtures: tiny_cls"):
        fixture_path(name)


# ------------------------------------------------------------------------------- tiny_cls


def test_cls_splits():
    splits = load_splits("tiny_cls")
    meta = json.loads((fixture_path("tiny_cls") / "meta.json").read_text())
    assert meta["format"] == "classification"
    assert meta["label_names"] == ["negative", "positive"]
    assert meta["generator"] == "flexkd.fixtures.build"
    assert isinstance(meta["seed"], int)
    assert meta["counts"] == CLS_SIZES
    for split, rows in splits.items():
        assert len(rows) == CLS_SIZES[split]
        for row in rows:
            assert set(row) == {"text", "label"}
            assert isinstance(row["text"], str) and row["text"].strip()
            assert type(row["label"]) is int and row["label"] in {0, 1}
            assert 6 <= len(row["text"].rstrip(".").split()) <= 16
        positives = sum(row["label"] for row in rows)
        assert abs(positives / len(rows) - 0.5) <= 0.1, (split, positives)
        assert meta["label_counts"][split] == {
            "negative": len(rows) - positives,
            "positive": positives,
        }
        assert len({row["text"] for row in rows}) == len(rows), f"duplicates in {split}"
    texts = {s: {row["text"] for row in rows} for s, rows in splits.items()}
    assert not texts["train"] & texts["validation"]
    assert not texts["train"] & texts["test"]
    assert not texts["validation"] & texts["test"]


def test_cls_labels_follow_the_rule_up_to_the_stated_noise():
    """Labels are the sign of the sentiment sum (negation included) except ~3% noise."""
    import re

    for split, rows in load_splits("tiny_cls").items():
        flipped = sum(
            (fixture_build.cls_sentiment(re.findall(r"\w+", r["text"].lower())) > 0) != (r["label"] == 1)
            for r in rows
        )
        assert flipped / len(rows) <= 0.07, (split, flipped)
    train = load_splits("tiny_cls")["train"]
    assert any(w in r["text"].lower().split() for r in train for w in ("not", "never", "hardly"))


# -------------------------------------------------------------------------- tiny_instruct


def _expected_response(prompt: str) -> str:
    task, _, rest = prompt.partition(": ")
    words = rest.split()
    return " ".join(
        {
            "reverse": words[::-1],
            "sort": sorted(words),
            "copy": words,
            "first": words[:1],
            "last": words[-1:],
        }[task]
    )


def test_instruct_splits():
    splits = load_splits("tiny_instruct")
    meta = json.loads((fixture_path("tiny_instruct") / "meta.json").read_text())
    assert meta["format"] == "instruction"
    assert meta["generator"] == "flexkd.fixtures.build"
    assert meta["counts"] == INSTRUCT_SIZES
    vocabulary = set(meta["words"])
    assert 25 <= len(vocabulary) <= 40
    for split, rows in splits.items():
        assert len(rows) == INSTRUCT_SIZES[split]
        tasks = set()
        for row in rows:
            assert set(row) == {"prompt", "response"}
            task, sep, rest = row["prompt"].partition(": ")
            assert sep and task in meta["tasks"], row
            tasks.add(task)
            assert 2 <= len(rest.split()) <= 6 and set(rest.split()) <= vocabulary, row
            assert row["response"] == _expected_response(row["prompt"]), row
        assert tasks == set(meta["tasks"]), split
        assert len({row["prompt"] for row in rows}) == len(rows), f"duplicates in {split}"
    prompts = {s: {row["prompt"] for row in rows} for s, rows in splits.items()}
    assert not prompts["train"] & prompts["validation"]
    assert not prompts["train"] & prompts["test"]
    assert not prompts["validation"] & prompts["test"]


# ------------------------------------------------------------------------- tiny_tokenizer


def test_tokenizer_config_on_disk():
    folder = fixture_path("tiny_tokenizer")
    config = json.loads((folder / "tokenizer_config.json").read_text())
    assert config["tokenizer_class"] == "PreTrainedTokenizerFast"
    assert config["model_max_length"] == 512
    for role, token in SPECIALS.items():
        assert config[role] == token
    model = json.loads((folder / "tokenizer.json").read_text())["model"]
    assert model["type"] in {"WordLevel", "WordPiece"}


def test_tokenizer_loads_offline_with_special_tokens(tokenizer):
    assert tokenizer.is_fast
    assert tokenizer.model_max_length == 512
    for role, token in SPECIALS.items():
        assert getattr(tokenizer, role) == token, role
    ids = [tokenizer.convert_tokens_to_ids(t) for t in SPECIALS.values()]
    assert tokenizer.pad_token_id == 0
    assert len(set(ids)) == len(ids), ids
    assert 50 <= len(tokenizer) <= 1000


def test_tokenizer_encodes_fixture_text(tokenizer):
    text = load_splits("tiny_cls")["test"][0]["text"]
    ids = tokenizer(text)["input_ids"]
    assert ids[0] == tokenizer.cls_token_id
    assert ids[-1] == tokenizer.sep_token_id
    assert tokenizer.unk_token_id not in ids
    tokens = tokenizer.convert_ids_to_tokens(ids)
    assert tokens[1:-1] == [w for w in text.lower().replace(".", " .").split()]
    # Unknown words do map to [UNK] (so the check above can fail).
    assert tokenizer.unk_token_id in tokenizer("zyzzyva quokka")["input_ids"]


def test_tokenizer_pads_with_id_zero(tokenizer):
    batch = tokenizer(["reverse: a", "Good film, not bad at all."], padding=True)
    short, long = batch["input_ids"]
    assert len(short) == len(long)
    n = sum(batch["attention_mask"][0])
    assert short[n:] and all(i == 0 for i in short[n:])
    assert batch["attention_mask"][0][n:] == [0] * (len(short) - n)
    assert short[n - 1] == tokenizer.sep_token_id


def test_no_fixture_text_maps_to_unk(tokenizer):
    texts = [r["text"] for rows in load_splits("tiny_cls").values() for r in rows]
    for rows in load_splits("tiny_instruct").values():
        texts += [r["prompt"] for r in rows] + [r["response"] for r in rows]
    encoded = tokenizer(texts)["input_ids"]
    bad = [t for t, ids in zip(texts, encoded, strict=True) if tokenizer.unk_token_id in ids]
    assert not bad, bad[:5]


# ---------------------------------------------------------------------------- learnability


def _bag_of_words(tokenizer, rows):
    import torch

    x = torch.zeros(len(rows), len(tokenizer))
    for i, ids in enumerate(tokenizer([r["text"] for r in rows], add_special_tokens=False)["input_ids"]):
        for j in ids:
            x[i, j] += 1
    return x, torch.tensor([r["label"] for r in rows], dtype=torch.float32)


def _logistic_regression_accuracy(tokenizer, train, test, steps=300):
    import torch

    torch.manual_seed(0)
    x, y = _bag_of_words(tokenizer, train)
    xt, yt = _bag_of_words(tokenizer, test)
    w = torch.zeros(x.shape[1], requires_grad=True)
    b = torch.zeros(1, requires_grad=True)
    opt = torch.optim.Adam([w, b], lr=0.05)
    for _ in range(steps):
        opt.zero_grad()
        torch.nn.functional.binary_cross_entropy_with_logits(x @ w + b, y).backward()
        opt.step()
    with torch.no_grad():
        return ((xt @ w + b > 0).float() == yt).float().mean().item()


def test_cls_has_real_but_imperfect_signal(tokenizer):
    splits = load_splits("tiny_cls")
    train, test = splits["train"], splits["test"]
    majority = int(sum(r["label"] for r in train) * 2 >= len(train))
    baseline = sum(r["label"] == majority for r in test) / len(test)
    accuracy = _logistic_regression_accuracy(tokenizer, train, test)
    assert baseline <= 0.6, baseline
    assert accuracy > 0.75, accuracy
    assert accuracy < 0.98, f"bag of words solves the task outright ({accuracy})"


def test_learnability_check_fails_without_signal(tokenizer):
    """With train labels shuffled the same regression stays near chance, so the > 0.75
    bar above is a real test of the data."""
    splits = load_splits("tiny_cls")
    labels = [r["label"] for r in splits["train"]]
    random.Random(0).shuffle(labels)
    shuffled = [{"text": r["text"], "label": y} for r, y in zip(splits["train"], labels, strict=True)]
    assert _logistic_regression_accuracy(tokenizer, shuffled, splits["test"]) < 0.7
