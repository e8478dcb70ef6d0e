"""Token alignment across tokenizers by character spans.

Two tokenizers split the same text differently ("unbelievable" -> un|believ|able vs unbel|ievable).
Fast tokenizers report, for every token, the characters of the *original* text it covers (its
offset mapping), also through normalisers such as lowercasing or accent stripping. Tokens are
grouped so that each group covers the same characters on both sides; a feature loss then compares
one pooled row per group (`pool_aligned`), so student and teacher rows describe the same text.

Rules (decided here, tested in tests/test_alignment.py):

* Spans are trimmed of surrounding whitespace first, so " word" (byte-level BPE, SentencePiece)
  and "word" (WordPiece) coincide; whitespace-only tokens ("Ġ", "▁", "\\n") join no group.
* Text tokens are grouped by a merge over both span lists in character order: a group starts at
  the earliest unassigned token and takes in every token, on either side, that starts before the
  group's end, so it closes where both sides reach the same character boundary. Tokens that split
  one character (byte-level pieces of an emoji) share a group. A group with tokens on one side
  only (text the other side lost) joins nothing.
* Special tokens (offsets (0, 0) / special-tokens mask) pair by structural position: the ones
  before the text with each other when both sides have the same number (CLS-CLS, BOS-BOS), the
  same after it (SEP-SEP, EOS-EOS); otherwise (a BOS on one side only) they join no group.
  (A side without any text token has no before/after: its specials pair in order when the
  counts agree.) Special tokens are never paired with text.
* Normalisers (lowercasing, accent stripping, deleting characters inside a word) need no special
  case: fast tokenizers map offsets back to the original characters. Only characters a
  normaliser removes at a token's edge, or whole words it removes, are left on one side.
* Characters covered on one side only, inside the range both sides cover, are *dropped* (a
  normaliser deleted them); characters beyond that range were cut by truncation and are not
  counted. `check_alignment` fails when an example drops more than a tolerated share.

Group ids per token (-1 = in no group) travel in batches as `batch["alignment"]`; with one shared
tokenizer no alignment is computed and batches stay exactly as they were (one row per token).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

from flexkd import losses
from flexkd.errors import ConfigError

# Span markers for tokens that have no characters of the aligned text.
SPECIAL = (-1, -1)  # a special token: paired by structural position (before / after the text)
OUTSIDE = (-2, -2)  # a token outside the aligned text (an instruction's prompt): never aligned

POOLS = ("mean", "last")


class AlignmentError(ConfigError):
    """Teacher and student tokens cannot be matched by the characters they cover."""


@dataclass
class Alignment:
    """Group ids of one example's student and teacher tokens (-1 = in no group), groups
    numbered 0..n_groups-1 in text order (leading specials first, trailing specials last)."""

    student: list[int]
    teacher: list[int]
    n_groups: int
    text_groups: int = 0  # groups of text tokens (specials excluded)
    one_to_one: int = 0  # text groups of exactly one token per side
    student_text_tokens: int = 0  # student tokens in text groups
    teacher_text_tokens: int = 0
    chars: int = 0  # non-whitespace characters inside the range both sides cover
    chars_dropped: int = 0  # ... of which only one side covers

    def groups(self) -> list[tuple[list[int], list[int]]]:
        """[(student token indices, teacher token indices)] per group, in group order."""
        out: list[tuple[list[int], list[int]]] = [([], []) for _ in range(self.n_groups)]
        for side, ids in ((0, self.student), (1, self.teacher)):
            for token, g in enumerate(ids):
                if g >= 0:
                    out[g][side].append(token)
        return out


@dataclass
class AlignmentStats:
    """Sums over examples; the shares and means are what results.json reports."""

    examples: int = 0
    groups: int = 0
    one_to_one: int = 0
    student_tokens: int = 0
    teacher_tokens: int = 0
    special_pairs: int = 0
    chars: int = 0
    chars_dropped: int = 0

    def add(self, a: Alignment) -> None:
        self.examples += 1
        self.groups += a.text_groups
        self.one_to_one += a.one_to_one
        self.student_tokens += a.student_text_tokens
        self.teacher_tokens += a.teacher_text_tokens
        self.special_pairs += a.n_groups - a.text_groups
        self.chars += a.chars
        self.chars_dropped += a.chars_dropped

    def to_dict(self) -> dict:
        g = max(self.groups, 1)
        return {"examples": self.examples, "groups": self.groups,
                "special_pairs": self.special_pairs,
                "one_to_one_share": self.one_to_one / g,
                "mean_group_size_student": self.student_tokens / g,
                "mean_group_size_teacher": self.teacher_tokens / g,
                "chars": self.chars, "chars_dropped": self.chars_dropped,
                "dropped_share": self.chars_dropped / max(self.chars, 1)}


# ---------------------------------------------------------------------------------- grouping


def _trim(span: tuple[int, int], text: str) -> tuple[int, int] | None:
    start, end = span
    while start < end and text[start].isspace():
        start += 1
    while end > start and text[end - 1].isspace():
        end -= 1
    return (start, end) if start < end else None


def _text_tokens(spans: Sequence[tuple[int, int]], text: str) -> list[tuple[int, int, int]]:
    """(start, end, token index) of the tokens that cover non-whitespace text, in text order."""
    out = []
    for k, span in enumerate(spans):
        if span[0] >= 0:
            trimmed = _trim(tuple(span), text)
            if trimmed:
                out.append((trimmed[0], trimmed[1], k))
    return sorted(out)


def _specials(spans: Sequence[tuple[int, int]], text_tokens) -> tuple[list[int], list[int]]:
    """Special tokens before the first and after the last text token."""
    special = [k for k, s in enumerate(spans) if tuple(s) == SPECIAL]
    if not text_tokens:
        return special, []
    first = min(k for _, _, k in text_tokens)
    last = max(k for _, _, k in text_tokens)
    return [k for k in special if k < first], [k for k in special if k > last]


def _clusters(student, teacher):
    """Merge two (start, end, index) lists into clusters of overlapping tokens:
    [(student indices, teacher indices)] in text order."""
    i = j = 0
    out = []
    while i < len(student) or j < len(teacher):
        take_student = j >= len(teacher) or (i < len(student) and student[i][0] <= teacher[j][0])
        first = student[i] if take_student else teacher[j]
        members: tuple[list[int], list[int]] = ([], [])
        end = first[1]
        while True:
            if i < len(student) and student[i][0] < end:
                members[0].append(student[i][2])
                end = max(end, student[i][1])
                i += 1
            elif j < len(teacher) and teacher[j][0] < end:
                members[1].append(teacher[j][2])
                end = max(end, teacher[j][1])
                j += 1
            else:
                break
        out.append(members)
    return out


def _coverage(tokens, length: int) -> bytearray:
    covered = bytearray(length)
    for start, end, _ in tokens:
        covered[start:end] = b"\x01" * (end - start)
    return covered


def align_spans(student_spans: Sequence[tuple[int, int]], teacher_spans: Sequence[tuple[int, int]],
                text: str) -> Alignment:
    """Group the tokens of two tokenizations of `text`. A span is the (start, end) characters of
    `text` a token covers, SPECIAL for a special token, OUTSIDE for a token outside `text`."""
    s_text, t_text = _text_tokens(student_spans, text), _text_tokens(teacher_spans, text)
    s_pre, s_post = _specials(student_spans, s_text)
    t_pre, t_post = _specials(teacher_spans, t_text)
    s_ids, t_ids = [-1] * len(student_spans), [-1] * len(teacher_spans)
    n = 0

    def pair_specials(s_list, t_list):
        nonlocal n
        if len(s_list) == len(t_list):  # same structure: pair in order; else drop (lone BOS)
            for a, b in zip(s_list, t_list, strict=True):
                s_ids[a], t_ids[b] = n, n
                n += 1

    if not s_text or not t_text:  # no text on a side: no before/after, pair specials in order
        s_pre, t_pre, s_post, t_post = s_pre + s_post, t_pre + t_post, [], []
    pair_specials(s_pre, t_pre)
    a = Alignment(s_ids, t_ids, 0)
    for s_members, t_members in _clusters(s_text, t_text):
        if s_members and t_members:
            for k in s_members:
                s_ids[k] = n
            for k in t_members:
                t_ids[k] = n
            n += 1
            a.text_groups += 1
            a.one_to_one += len(s_members) == 1 and len(t_members) == 1
            a.student_text_tokens += len(s_members)
            a.teacher_text_tokens += len(t_members)
    pair_specials(s_post, t_post)
    a.n_groups = n
    if s_text and t_text:
        lo = max(s_text[0][0], t_text[0][0])
        hi = min(max(e for _, e, _ in s_text), max(e for _, e, _ in t_text))
        s_cov, t_cov = _coverage(s_text, len(text)), _coverage(t_text, len(text))
        for c in range(lo, hi):
            if not text[c].isspace() and (s_cov[c] or t_cov[c]):
                a.chars += 1
                a.chars_dropped += s_cov[c] != t_cov[c]
    return a


# ------------------------------------------------------------------------------------ pooling


def pool_aligned(hidden: torch.Tensor, group_ids: torch.Tensor, n_groups: int,
                 how: str = "mean") -> torch.Tensor:
    """(B, L, d) token features and (B, L) group ids (-1 = none) -> (n_groups, d): row g is the
    mean (or the last token) of group g's tokens. Both sides pooled with their own ids give rows
    that describe the same characters."""
    if how not in POOLS:
        raise ConfigError(f"alignment.pool={how!r}; use one of {POOLS}")
    if hidden.shape[:2] != group_ids.shape:
        raise ValueError(f"features {tuple(hidden.shape)} and group ids {tuple(group_ids.shape)} "
                         "do not align")
    d = hidden.shape[-1]
    flat = hidden.reshape(-1, d)
    ids = group_ids.reshape(-1).to(hidden.device)
    valid = ids >= 0
    rows, groups = flat[valid], ids[valid]
    if how == "mean":
        sums = flat.new_zeros(n_groups, d).index_add(0, groups, rows)
        counts = torch.zeros(n_groups, device=flat.device, dtype=flat.dtype).index_add(
            0, groups, torch.ones_like(groups, dtype=flat.dtype))
        return sums / counts.clamp(min=1).unsqueeze(1)
    # Tokens of a group are contiguous within one example, so the largest flat position is
    # the group's last token.
    positions = torch.arange(flat.shape[0], device=flat.device)[valid]
    last = torch.zeros(n_groups, dtype=torch.long, device=flat.device).scatter_reduce(
        0, groups, positions, reduce="amax", include_self=False)
    return flat[last]


def aligned_rows(batch: dict, student_hidden: torch.Tensor, teacher_hidden: torch.Tensor,
                 pool: str = "mean") -> tuple[torch.Tensor, torch.Tensor]:
    """(G, d_S), (G, d_T) rows that feature losses compare. One shared tokenizer (no
    "alignment" in the batch): the valid tokens one-to-one, exactly as before. Different
    tokenizers: one pooled row per aligned group."""
    if "alignment" not in batch:
        mask = batch["student"]["attention_mask"].bool()
        return losses.masked_tokens(student_hidden, mask), losses.masked_tokens(teacher_hidden, mask)
    alignment = batch["alignment"]
    if alignment is None:
        raise AlignmentError("the teacher's and student's tokenizers differ and are not both fast "
                             "tokenizers (no offset mapping), so their tokens cannot be aligned; "
                             "use fast tokenizers or a strategy without token features (sft)")
    n = alignment["n_groups"]
    return (pool_aligned(student_hidden, alignment["student"], n, pool),
            pool_aligned(teacher_hidden, alignment["teacher"], n, pool))


def collate_alignment(alignments: Sequence[Alignment]) -> dict:
    """Per-example alignments -> {"student": (B, Ls), "teacher": (B, Lt), "n_groups": G} with
    group ids numbered consecutively across the batch (padding -1)."""
    from torch.nn.utils.rnn import pad_sequence

    student, teacher, offset = [], [], 0
    for a in alignments:
        s, t = torch.tensor(a.student, dtype=torch.long), torch.tensor(a.teacher, dtype=torch.long)
        student.append(torch.where(s >= 0, s + offset, s))
        teacher.append(torch.where(t >= 0, t + offset, t))
        offset += a.n_groups
    return {"student": pad_sequence(student, batch_first=True, padding_value=-1),
            "teacher": pad_sequence(teacher, batch_first=True, padding_value=-1),
            "n_groups": offset}


# ------------------------------------------------------------------------------------- checks


def _shown_tokens(tokenizer, ids: list[int], limit: int = 24) -> str:
    tokens = tokenizer.convert_ids_to_tokens(ids)
    more = f" ... (+{len(tokens) - limit})" if len(tokens) > limit else ""
    return repr(tokens[:limit])[:-1] + more + "]"


def check_alignment(examples: Sequence[dict], student_tok, teacher_tok,
                    max_dropped_share: float = 0.1) -> AlignmentStats:
    """Statistics of aligned examples (dicts as DistillDataModule builds them: "student" and
    "teacher" Encoded, "alignment", "where"); raises AlignmentError, naming the first bad example
    and both tokenizations, when an example has text but no aligned group, or more than
    `max_dropped_share` of its characters are covered on one side only."""
    if not student_tok.is_fast or not teacher_tok.is_fast:
        slow = "student" if not student_tok.is_fast else "teacher"
        raise AlignmentError(f"the {slow}'s tokenizer is not a fast tokenizer, so it has no offset "
                             "mapping to align tokens by characters; load a fast tokenizer "
                             "(tokenizer.json) or use a strategy without token features (sft)")
    stats = AlignmentStats()
    for ex in examples:
        a = ex["alignment"]
        bad = (a.chars and a.chars_dropped > max_dropped_share * a.chars) or (
            a.text_groups == 0 and (any(s[0] >= 0 for s in ex["student"].spans)
                                   or any(s[0] >= 0 for s in ex["teacher"].spans)))
        if bad:
            raise AlignmentError(
                f"{ex.get('where', 'example')}: teacher and student tokens cannot be aligned by "
                f"characters ({a.chars_dropped} of {a.chars} characters are covered by one tokenizer "
                f"only, {a.text_groups} aligned groups) in {ex['student'].text!r}; student tokens "
                f"{_shown_tokens(student_tok, ex['student'].input_ids)}, teacher tokens "
                f"{_shown_tokens(teacher_tok, ex['teacher'].input_ids)}. Use tokenizers that keep "
                "the text's characters, or a strategy without token features (sft)")
        stats.add(a)
    return stats
