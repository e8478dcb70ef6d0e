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
