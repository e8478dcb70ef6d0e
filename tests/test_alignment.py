"""Token alignment across tokenizers: groups by character spans, pooling, batches, checks."""

from __future__ import annotations

import pytest
import torch
from omegaconf import OmegaConf
from transformers import AutoTokenizer, PreTrainedTokenizerFast

from flexkd import losses
from flexkd.data.alignment import (
    OUTSIDE,
    SPECIAL,
    AlignmentError,
    AlignmentStats,
    align_spans,
    aligned_rows,
    check_alignment,
    collate_alignment,
    pool_aligned,
)
from flexkd.data.datamodule import DistillDataModule
from flexkd.data.encoding import encode_classification
from flexkd.data.tasks import TaskSpec
from flexkd.errors import ConfigError
from flexkd.fixtures import fixture_path
from flexkd.models import IGNORE_INDEX
from flexkd.sources import resolve_source

S = SPECIAL


@pytest.fixture(scope="module")
def word_tok():
    return AutoTokenizer.from_pretrained(fixture_path("tiny_tokenizer"))


@pytest.fixture(scope="module")
def bpe_tok():
    return AutoTokenizer.from_pretrained(fixture_path("tiny_tokenizer_bpe"))


def wordpiece(words: list[str], template: str = "[CLS] $A [SEP]", normalizer=None):
    """A fast tokenizer whose splits are known exactly: WordPiece over `words`, whitespace /
    punctuation pre-tokenisation, `template` around each text."""
    from tokenizers import Tokenizer, pre_tokenizers, processors
    from tokenizers.models import WordPiece

    specials = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "<s>", "</s>"]
    vocab = {t: i for i, t in enumerate(specials + words)}
    tok = Tokenizer(WordPiece(vocab, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    if normalizer is not None:
        tok.normalizer = normalizer
    used = [t for t in specials if t in template]
    tok.post_processor = processors.TemplateProcessing(
        single=template, special_tokens=[(t, vocab[t]) for t in used])
    return PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="[PAD]", unk_token="[UNK]",
                                   cls_token="[CLS]", sep_token="[SEP]", bos_token="<s>",
                                   eos_token="</s>")


# ------------------------------------------------------------------------------- groups


def test_word_split_three_two_forms_one_group_between_paired_specials():
    # "unbelievable": un|believ|able (student) vs unbel|ievable (teacher)
    a = align_spans([S, (0, 2), (2, 8), (8, 12), S], [S, (0, 5), (5, 12), S], "unbelievable")
    assert a.groups() == [([0], [0]), ([1, 2, 3], [1, 2]), ([4], [3])]
    assert a.student == [0, 1, 1, 1, 2] and a.teacher == [0, 1, 1, 2]
    assert (a.text_groups, a.one_to_one, a.student_text_tokens, a.teacher_text_tokens) == (1, 0, 3, 2)
    assert (a.chars, a.chars_dropped) == (12, 0)


def test_real_wordpiece_tokenizers_split_three_two():
    student = wordpiece(["un", "##believ", "##able", "story"])
    teacher = wordpiece(["unbel", "##ievable", "story"], template="<s> $A </s>")
    row = {"text": "unbelievable story", "label": 0}
    es = encode_classification(row, student, 32, ["a", "b"], "x:1", spans=True)
    et = encode_classification(row, teacher, 32, ["a", "b"], "x:1", spans=True)
    assert student.convert_ids_to_tokens(es.input_ids) == [
        "[CLS]", "un", "##believ", "##able", "story", "[SEP]"]
    assert teacher.convert_ids_to_tokens(et.input_ids) == ["<s>", "unbel", "##ievable", "story", "</s>"]
    assert es.spans == [S, (0, 2), (2, 8), (8, 12), (13, 18), S]
    a = align_spans(es.spans, et.spans, es.text)
    # CLS pairs with <s> and SEP with </s>: same structural position, different tokens.
    assert a.groups() == [([0], [0]), ([1, 2, 3], [1, 2]), ([4], [3]), ([5], [4])]


def test_bos_on_one_side_only_is_dropped_and_never_paired_with_text():
    text = "hello world"
    a = align_spans([S, (0, 5), (6, 11), S], [(0, 5), (5, 11), S], text)
    assert a.student == [-1, 0, 1, 2] and a.teacher == [0, 1, 2]
    assert a.groups() == [([1], [0]), ([2], [1]), ([3], [2])]  # EOS-EOS still paired
    assert (a.text_groups, a.one_to_one, a.chars_dropped) == (2, 2, 0)


def test_equal_counts_with_different_splits_are_aligned_by_spans_not_positions():
    # "abcd ef": abc|d|ef vs a|bcd|ef - three tokens each, but only "ef" coincides.
    a = align_spans([(0, 3), (3, 4), (5, 7)], [(0, 1), (1, 4), (5, 7)], "abcd ef")
    assert a.groups() == [([0, 1], [0, 1]), ([2], [2])]
    assert a.one_to_one == 1 and a.text_groups == 2


def test_unicode_accents_emoji_and_cjk_with_real_tokenizers(word_tok, bpe_tok):
    text = "Café 😀 東京"
    es = encode_classification({"text": text, "label": 0}, word_tok, 32, ["a", "b"], "x:1", spans=True)
    et = encode_classification({"text": text, "label": 0}, bpe_tok, 32, ["a", "b"], "x:1", spans=True)
    # WordLevel: one (unknown) token per word; byte-level BPE: one piece per UTF-8 byte or two,
    # all pieces of one character reporting that character's span.
    assert es.spans == [S, (0, 4), (5, 6), (7, 9), S]
    assert et.spans == [S, (0, 1), (1, 2), (2, 3), (3, 4), (3, 4), (4, 5),
                        (5, 6), (5, 6), (5, 6), (5, 6), (6, 7),
                        (7, 8), (7, 8), (7, 8), (8, 9), (8, 9), (8, 9), S]
    a = align_spans(es.spans, et.spans, text)
    assert a.groups() == [([0], [0]), ([1], [1, 2, 3, 4, 5]), ([2], [7, 8, 9, 10]),
                          ([3], [12, 13, 14, 15, 16, 17]), ([4], [18])]
    assert a.teacher[6] == a.teacher[11] == -1  # the spaces ("Ġ") join no group
    assert (a.chars, a.chars_dropped) == (7, 0)


def test_whitespace_only_tokens_and_leading_spaces():
    text = "a  b\n c"
    # student: a | b | c ; teacher: a | "  b" | "\n" | " c" (spaces folded into pieces)
    a = align_spans([(0, 1), (3, 4), (6, 7)], [(0, 1), (1, 4), (4, 5), (5, 7)], text)
    assert a.groups() == [([0], [0]), ([1], [1]), ([2], [3])]
    assert a.teacher == [0, 1, -1, 2]
    assert (a.one_to_one, a.chars, a.chars_dropped) == (3, 3, 0)


def test_characters_one_side_lost_are_counted_as_dropped_truncation_is_not():
    # The teacher's normaliser deleted the control character at 1.
    a = align_spans([(0, 1), (1, 2), (2, 3)], [(0, 1), (2, 3)], "a\x07b")
    assert a.groups() == [([0], [0]), ([2], [1])] and a.student[1] == -1
    assert (a.chars, a.chars_dropped) == (3, 1)
    # The teacher was truncated after "hello": "world" is cut, not dropped.
    a = align_spans([(0, 5), (6, 11)], [(0, 5)], "hello world")
    assert a.groups() == [([0], [0])] and a.student == [0, -1]
    assert (a.chars, a.chars_dropped) == (5, 0)


def test_prompt_tokens_outside_the_text_are_never_aligned():
    o = OUTSIDE
    a = align_spans([o, o, o, (1, 4), S], [o, o, (0, 2), (2, 4), S], " red")
    assert a.student == [-1, -1, -1, 0, 1] and a.teacher == [-1, -1, 0, 0, 1]


def test_statistics_on_a_known_example():
    stats = AlignmentStats()
    stats.add(align_spans([S, (0, 2), (2, 8), (8, 12), S], [S, (0, 5), (5, 12), S], "unbelievable"))
    stats.add(align_spans([(0, 3), (3, 4), (5, 7)], [(0, 1), (1, 4), (5, 7)], "abcd ef"))
    assert stats.to_dict() == {
        "examples": 2, "groups": 3, "special_pairs": 2, "one_to_one_share": 1 / 3,
        "mean_group_size_student": (3 + 2 + 1) / 3, "mean_group_size_teacher": (2 + 2 + 1) / 3,
        "chars": 12 + 6, "chars_dropped": 0, "dropped_share": 0.0}


# ------------------------------------------------------------------------------- pooling


def test_pool_mean_and_last_equal_hand_computed_rows():
    hidden = torch.arange(2 * 4 * 2, dtype=torch.float64).reshape(2, 4, 2)
    # example 0: tokens 0,1 -> group 0, token 2 -> group 1, token 3 padding;
    # example 1: token 0 -> group 2, tokens 1,2 -> group 3 (a 2-token group), token 3 none.
    ids = torch.tensor([[0, 0, 1, -1], [2, 3, 3, -1]])
    mean = pool_aligned(hidden, ids, 4, "mean")
    assert torch.equal(mean, torch.tensor([[1.0, 2.0], [4.0, 5.0], [8.0, 9.0], [11.0, 12.0]],
                                          dtype=torch.float64))
    last = pool_aligned(hidden, ids, 4, "last")
    assert torch.equal(last, torch.tensor([[2.0, 3.0], [4.0, 5.0], [8.0, 9.0], [12.0, 13.0]],
                                          dtype=torch.float64))


def test_pool_mean_gradient_spreads_evenly_over_a_group():
    hidden = torch.randn(1, 3, 2, requires_grad=True)
    pool_aligned(hidden, torch.tensor([[0, 0, -1]]), 1, "mean").sum().backward()
    assert torch.equal(hidden.grad, torch.tensor([[[0.5, 0.5], [0.5, 0.5], [0.0, 0.0]]]))


def test_pool_rejects_unknown_mode():
    with pytest.raises(ConfigError, match="alignment.pool=.max."):
        pool_aligned(torch.zeros(1, 1, 1), torch.zeros(1, 1, dtype=torch.long), 1, "max")


def test_collate_numbers_groups_consecutively_across_the_batch():
    a = align_spans([S, (0, 2), (2, 8), (8, 12), S], [S, (0, 5), (5, 12), S], "unbelievable")
    b = align_spans([(0, 5), (5, 11), S], [S, (0, 5), (6, 11), S], "hello world")
    batch = collate_alignment([a, b])
    assert batch["n_groups"] == 3 + 3
    assert batch["student"].tolist() == [[0, 1, 1, 1, 2], [3, 4, 5, -1, -1]]
    assert batch["teacher"].tolist() == [[0, 1, 1, 2], [-1, 3, 4, 5]]


def test_aligned_rows_pool_both_sides_into_matching_rows():
    a = align_spans([(0, 3), (3, 4), (5, 7)], [(0, 1), (1, 4), (5, 7)], "abcd ef")
    batch = {"alignment": collate_alignment([a])}
    sh = torch.tensor([[[1.0], [3.0], [5.0]]])
    th = torch.tensor([[[10.0, 0.0], [20.0, 0.0], [30.0, 1.0]]])
    s_rows, t_rows = aligned_rows(batch, sh, th, "mean")
    assert torch.equal(s_rows, torch.tensor([[2.0], [5.0]]))
    assert torch.equal(t_rows, torch.tensor([[15.0, 0.0], [30.0, 1.0]]))
    s_last, t_last = aligned_rows(batch, sh, th, "last")
    assert torch.equal(s_last, torch.tensor([[3.0], [5.0]]))
    assert torch.equal(t_last, torch.tensor([[20.0, 0.0], [30.0, 1.0]]))


def test_aligned_rows_without_alignment_are_the_masked_tokens_one_to_one():
    mask = torch.tensor([[1, 1, 0], [1, 0, 0]])
    batch = {"student": {"attention_mask": mask}}
    sh, th = torch.randn(2, 3, 4), torch.randn(2, 3, 5)
    s_rows, t_rows = aligned_rows(batch, sh, th)
    assert torch.equal(s_rows, losses.masked_tokens(sh, mask.bool()))
    assert torch.equal(t_rows, torch.stack([th[0, 0], th[0, 1], th[1, 0]]))


def test_aligned_rows_refuse_differing_tokenizers_without_offsets():
    with pytest.raises(AlignmentError, match="not both fast tokenizers"):
        aligned_rows({"alignment": None}, torch.zeros(1, 1, 1), torch.zeros(1, 1, 1))


# ---------------------------------------------------------------------------- datamodule


def _task(name: str) -> TaskSpec:
    return TaskSpec.from_config(OmegaConf.load(f"conf/task/{name}.yaml"), resolve_source)


def _old_pad(seqs, value):
    """The hand-written padding batches were built with before alignment existed."""
    width = max(len(s) for s in seqs)
    out = torch.full((len(seqs), width), value, dtype=torch.long)
    for i, s in enumerate(seqs):
        out[i, : len(s)] = torch.tensor(s, dtype=torch.long)
    return out


@pytest.mark.parametrize("task", ["tiny_cls", "tiny_instruct"])
def test_shared_tokenizer_batches_are_bit_identical_to_before(word_tok, task):
    data = DistillDataModule(_task(task), word_tok, word_tok, batch_size=8)
    assert data.shared and not data.alignable
    for batch in data.train_dataloader():
        assert "alignment" not in batch and batch["teacher"] is batch["student"]
        examples = [data.splits["train"][i] for i in batch["index"].tolist()]
        assert all(e["student"].spans is None for e in examples)  # no offsets computed
        side = [e["student"] for e in examples]
        ids = _old_pad([e.input_ids for e in side], word_tok.pad_token_id)
        mask = _old_pad([[1] * len(e.input_ids) for e in side], 0)
        labels = (torch.tensor([e.labels for e in side]) if task == "tiny_cls"
                  else _old_pad([e.labels for e in side], IGNORE_INDEX))
        for key, want in (("input_ids", ids), ("attention_mask", mask), ("labels", labels)):
            got = batch["student"][key]
            assert got.dtype == want.dtype and torch.equal(got, want), key


def test_cross_tokenizer_instruction_batches_align_the_response_only(word_tok, bpe_tok):
    data = DistillDataModule(_task("tiny_instruct"), word_tok, bpe_tok, batch_size=8)
    assert not data.shared and data.alignable
    batch = next(iter(data.train_dataloader()))
    groups = batch["alignment"]
    g = groups["n_groups"]
    for side in ("student", "teacher"):
        ids = groups[side]
        assert ids.shape == batch[side]["input_ids"].shape
        # every group appears on both sides; prompt tokens (label -100) are in no group
        assert sorted(set(ids[ids >= 0].tolist())) == list(range(g))
        assert (ids[batch[side]["labels"] == IGNORE_INDEX] == -1).all()
        assert (ids[batch[side]["attention_mask"] == 0] == -1).all()
    s_rows, t_rows = aligned_rows(batch, torch.randn(*groups["student"].shape, 3),
                                  torch.randn(*groups["teacher"].shape, 5))
    assert s_rows.shape == (g, 3) and t_rows.shape == (g, 5)


def test_fixture_pair_aligns_lowercased_and_cased_text_without_loss(word_tok, bpe_tok):
    """The student lowercases, the teacher keeps case: offsets refer to the original text, so
    every character is matched; the BPE splits words the WordLevel tokenizer keeps whole."""
    data = DistillDataModule(_task("tiny_cls"), word_tok, bpe_tok, batch_size=8)
    stats = check_alignment(data.alignment_sample(64), word_tok, bpe_tok)
    d = stats.to_dict()
    assert d["examples"] == 64 and d["chars_dropped"] == 0 and d["special_pairs"] == 128
    assert d["mean_group_size_student"] == 1.0 and d["mean_group_size_teacher"] > 1.3
    assert 0.3 < d["one_to_one_share"] < 0.95
    ex = data.alignment_sample(1)[0]
    assert ex["student"].text.startswith("Honestly")
    assert ex["alignment"].groups()[1] == ([1], [1, 2])  # honestly = H|onestly


def test_check_alignment_fails_in_one_line_naming_example_and_both_tokenizations(word_tok):
    from tokenizers import Regex, normalizers

    # A normaliser that deletes each word from its first vowel on: most characters are left
    # without a teacher token ("Honestly" -> "H").
    cut = wordpiece(["."], normalizer=normalizers.Replace(Regex("[aeiouAEIOU]\\w*"), ""))
    data = DistillDataModule(_task("tiny_cls"), word_tok, cut, batch_size=8)
    with pytest.raises(AlignmentError) as err:
        check_alignment(data.alignment_sample(4), word_tok, cut)
    msg = str(err.value)
    assert "\n" not in msg.replace("\\n", "")
    assert "tiny_cls/train.jsonl:1: teacher and student tokens cannot be aligned by characters " \
           "(70 of 93 characters are covered by one tokenizer only, 14 aligned groups)" in msg
    assert "student tokens ['[CLS]', 'honestly', 'seemed'" in msg
    assert "teacher tokens ['[CLS]', '[UNK]', '[UNK]'" in msg
    assert "strategy without token features (sft)" in msg


def test_normalisers_that_delete_inside_tokens_keep_their_alignment(word_tok):
    """Offsets map normalised tokens back to the original characters, so a token whose vowels
    were deleted ("hnstly") still covers "Honestly"; only word-final deletions are lost."""
    from tokenizers import Regex, normalizers

    vowelless = wordpiece(["."], normalizer=normalizers.Replace(Regex("[aeiouAEIOU]"), ""))
    data = DistillDataModule(_task("tiny_cls"), word_tok, vowelless, batch_size=8)
    ex = data.alignment_sample(1)[0]
    assert ex["teacher"].spans[1] == (0, 8)  # "hnstly" -> "Honestly"
    a = ex["alignment"]
    assert a.one_to_one == a.text_groups == 17 and (a.chars, a.chars_dropped) == (93, 4)
    assert check_alignment([ex], word_tok, vowelless).chars_dropped == 4  # under 10%: passes


def test_sft_style_loading_never_checks_alignment(word_tok):
    """Loading data with two tokenizers does not raise even when they cannot be aligned (sft
    needs no teacher tokens); only check_alignment refuses."""
    from tokenizers import Regex, normalizers

    deleting = wordpiece(["x"], normalizer=normalizers.Replace(Regex("."), ""))
    data = DistillDataModule(_task("tiny_cls"), word_tok, deleting, batch_size=8)
    batch = next(iter(data.train_dataloader()))
    assert batch["alignment"]["n_groups"] == 2 * 8  # only the special-token pairs
    with pytest.raises(AlignmentError, match="train.jsonl:1: .*0 aligned groups"):
        check_alignment(data.alignment_sample(1), word_tok, deleting)


class _SlowView:
    """A tokenizer that behaves like `tok` but reports no offsets support (like a slow one)."""

    is_fast = False

    def __init__(self, tok):
        self._tok = tok

    def __getattr__(self, name):
        return getattr(self._tok, name)

    def __call__(self, *args, **kwargs):
        return self._tok(*args, **kwargs)


def test_a_slow_tokenizer_loads_for_sft_but_token_strategies_are_refused(word_tok, bpe_tok):
    slow = _SlowView(bpe_tok)
    data = DistillDataModule(_task("tiny_cls"), word_tok, slow, batch_size=4)
    assert not data.shared and not data.alignable
    batch = next(iter(data.train_dataloader()))
    assert batch["alignment"] is None and batch["teacher"]["input_ids"].shape[0] == 4
    assert data.alignment_sample(4) == [] and data.alignment_stats() is None
    with pytest.raises(AlignmentError, match="the teacher's tokenizer is not a fast tokenizer"):
        check_alignment(data.alignment_sample(4), word_tok, slow)
    with pytest.raises(AlignmentError, match="not both fast tokenizers"):
        aligned_rows(batch, torch.zeros(4, 1, 1), torch.zeros(4, 1, 1))


# ------------------------------------------------------------------------------ fixture


def test_bpe_fixture_tokenizer_differs_from_the_word_level_one(word_tok, bpe_tok):
    assert bpe_tok.is_fast and bpe_tok.pad_token_id == 0
    assert 400 <= len(bpe_tok) <= 480 and len(bpe_tok) != len(word_tok)
    text = "Pleasant film, not bad."
    assert bpe_tok.convert_ids_to_tokens(bpe_tok(text)["input_ids"]) == [
        "<s>", "P", "le", "as", "ant", "Ġfilm", ",", "Ġ", "n", "ot", "Ġb", "a", "d", ".", "</s>"]
    assert bpe_tok.decode(bpe_tok(text)["input_ids"], skip_special_tokens=True) == text
