"""Task rows -> token ids: response-only labels, truncation that keeps what is scored."""

import pytest
from transformers import AutoTokenizer

from flexkd.data.encoding import encode_instruction, encode_label_words, label_word_ids
from flexkd.data.formatting import clip_words
from flexkd.fixtures import fixture_path
from flexkd.models import IGNORE_INDEX


@pytest.fixture(scope="module")
def tok():
    return AutoTokenizer.from_pretrained(fixture_path("tiny_tokenizer"))


def test_instruction_labels_cover_the_response_and_eos_only(tok):
    enc = encode_instruction({"prompt": "reverse: a b c", "response": "c b a"}, tok, 64, "x:1")
    assert enc.input_ids[0] == tok.bos_token_id and not enc.truncated
    n_response = len(tok(" c b a", add_special_tokens=False)["input_ids"]) + 1
    assert enc.labels[-n_response:] == enc.input_ids[-n_response:]
    assert enc.labels[-1] == tok.eos_token_id
    assert set(enc.labels[:-n_response]) == {IGNORE_INDEX}


def test_long_prompts_lose_their_middle_but_keep_bos_prompt_end_and_response(tok):
    prompt = "copy: " + " ".join(["dog"] * 40) + " owl"
    enc = encode_instruction({"prompt": prompt, "response": "owl"}, tok, 16, "x:1")
    assert enc.truncated and len(enc.input_ids) == 16
    assert enc.input_ids[0] == tok.bos_token_id
    text = tok.decode(enc.input_ids)
    assert "owl response :" in text and text.endswith("owl </s>")


def test_clip_words_keeps_the_start(tok):
    assert clip_words("a b c d", 2) == "a b" and clip_words("a b", 5) == "a b"
    assert clip_words("a  b", None) == "a  b"
    enc = encode_instruction({"prompt": "first: dog owl fish", "response": "dog"}, tok, 64,
                             "x:1", max_prompt_words=3)
    assert "owl" in tok.decode(enc.input_ids) and "fish" not in tok.decode(enc.input_ids)


def test_label_words_target_is_the_label_token_without_eos(tok):
    names = ["negative", "positive"]
    enc = encode_label_words({"text": "good film", "label": 1}, tok, 32, names, "x:1")
    ids = label_word_ids(tok, names)
    assert ids[0] != ids[1] and all(len(i) == 1 for i in ids)
    assert enc.input_ids[-1] == ids[1][0] and enc.labels[-1] == ids[1][0]
    assert enc.labels[:-1] == [IGNORE_INDEX] * (len(enc.input_ids) - 1)


# ------------------------------------------------------------------ spans (cross-tokenizer)

NAMES = ["negative", "positive"]


@pytest.fixture(scope="module")
def bpe():
    return AutoTokenizer.from_pretrained(fixture_path("tiny_tokenizer_bpe"))


def _covered(enc) -> list[str]:
    return [enc.text[a:b] for a, b in enc.spans if a >= 0]


@pytest.mark.parametrize("max_length", [64, 6])
def test_asking_for_spans_leaves_ids_and_labels_unchanged(tok, bpe, max_length):
    from flexkd.data.encoding import encode_classification

    row_cls = {"text": "Good film, not bad at all.", "label": 1}
    row_ins = {"prompt": "reverse: red fox owl", "response": "owl fox red"}
    for t in (tok, bpe):
        for encode, row, args in (
            (encode_classification, row_cls, (NAMES, "x:1")),
            (encode_label_words, row_cls, (NAMES, "x:1")),
            (encode_instruction, row_ins, ("x:1",)),
        ):
            plain = encode(row, t, max_length, *args)
            with_spans = encode(row, t, max_length, *args, spans=True)
            assert plain.spans is None and plain.text is None
            assert (with_spans.input_ids, with_spans.labels) == (plain.input_ids, plain.labels)
            assert with_spans.truncated == plain.truncated == (max_length == 6)
            assert len(with_spans.spans) == len(with_spans.input_ids), encode.__name__


def test_instruction_spans_cover_the_response_only(bpe):
    from flexkd.data.alignment import OUTSIDE, SPECIAL

    enc = encode_instruction({"prompt": "reverse: red fox", "response": "fox red"}, bpe, 64, "x:1",
                             spans=True)
    assert enc.text == " fox red"
    n_prompt = sum(1 for label in enc.labels if label == IGNORE_INDEX)
    assert enc.spans[:n_prompt] == [OUTSIDE] * n_prompt  # BOS and prompt
    assert enc.spans[-1] == SPECIAL  # EOS
    assert _covered(enc) == [" fox", " red"]  # byte-level pieces carry their leading space


def test_label_word_spans_continue_after_the_context(tok):
    from flexkd.data.alignment import SPECIAL

    enc = encode_label_words({"text": "good film", "label": 1}, tok, 32, NAMES, "x:1", spans=True)
    assert enc.text == "good film\nAnswer: positive"
    assert enc.spans[0] == SPECIAL  # BOS
    assert _covered(enc) == ["good", "film", "Answer", ":", "positive"]
    short = encode_label_words({"text": "good film", "label": 0}, tok, 4, NAMES, "x:1", spans=True)
    # 4 tokens: BOS, the last two context tokens, the label word
    assert short.truncated and _covered(short) == ["Answer", ":", "negative"]
