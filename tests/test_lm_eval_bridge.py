"""lm-eval bridge: an in-memory tiny Llama scored on JSON Lines tasks through lm-eval."""

from __future__ import annotations

import json
import math
import random
from pathlib import Path

import pytest
import torch

from flexkd.data.formatting import (
    format_classification_context,
    format_label_choice,
    format_prompt,
)
from flexkd.evaluation.lm_eval_bridge import (
    LmEvalSettings,
    LmEvalTask,
    _special_tokens,
    evaluate_causal_lm,
    evaluate_stock_tasks,
)

FIXTURE_TOKENIZER = Path(__file__).resolve().parents[1] / "flexkd" / "fixtures" / "tiny_tokenizer"
SPECIALS = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", "<s>", "</s>"]
WORDS = ["red", "blue", "green", "cat", "dog", "sun", "moon", "tree"]
LABELS = ["bad", "good"]  # label 0, label 1
TEXT_WORDS = ["movie", "plot", "film", "story", "cast", "scene"]
N_INSTRUCT, N_CLS, N_GOOD = 12, 10, 3
WRONG_WORD = "zebra"  # never in a reference


# ----------------------------------------------------------------------------- fixtures


def _own_tokenizer(post_processor: bool = True):
    """Word-level fast tokenizer shaped like flexkd/fixtures/tiny_tokenizer ([PAD]=0, ...,
    lowercase, whitespace/punctuation split, optionally `[CLS] $A [SEP]` around a sequence)."""
    from tokenizers import Tokenizer, normalizers, pre_tokenizers, processors
    from tokenizers.models import WordLevel
    from transformers import PreTrainedTokenizerFast

    words = SPECIALS + ["reverse", "response", "answer", ":", "."] + WORDS + LABELS + TEXT_WORDS
    tok = Tokenizer(WordLevel(vocab={w: i for i, w in enumerate(words)}, unk_token="[UNK]"))
    tok.normalizer = normalizers.Lowercase()
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    if post_processor:
        tok.post_processor = processors.TemplateProcessing(
            single="[CLS] $A [SEP]", special_tokens=[("[CLS]", 2), ("[SEP]", 3)]
        )
    return PreTrainedTokenizerFast(
        tokenizer_object=tok,
        pad_token="[PAD]",
        unk_token="[UNK]",
        cls_token="[CLS]",
        sep_token="[SEP]",
        mask_token="[MASK]",
        bos_token="<s>",
        eos_token="</s>",
    )


@pytest.fixture(scope="module")
def tok():
    """The repo's fixture tokenizer when it exists and knows our words, else our own."""
    if (FIXTURE_TOKENIZER / "tokenizer.json").is_file():
        from transformers import AutoTokenizer

        fixture = AutoTokenizer.from_pretrained(str(FIXTURE_TOKENIZER))
        ids = fixture(" ".join(WORDS + LABELS + TEXT_WORDS), add_special_tokens=False)["input_ids"]
        if fixture.unk_token_id not in ids and fixture.eos_token_id is not None:
            return fixture
    return _own_tokenizer()


def _model_ids(tok, text: str) -> list[int]:
    """What the model should be fed for `text`: what it was trained on, [BOS] + the text's
    tokens (no trailing [SEP], which would split context from continuation wrongly)."""
    return [tok.bos_token_id] + tok(text, add_special_tokens=False)["input_ids"]


def _tiny_llama(tok, seed: int = 0):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    config = LlamaConfig(
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        intermediate_size=64,
        vocab_size=len(tok),
        max_position_embeddings=256,
        pad_token_id=tok.pad_token_id,
        bos_token_id=tok.bos_token_id,
        eos_token_id=tok.eos_token_id,
    )
    return LlamaForCausalLM(config)


@pytest.fixture(scope="module")
def model(tok):
    return _tiny_llama(tok)


def _write_jsonl(path: Path, rows: list[dict]) -> None:
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))


@pytest.fixture(scope="module")
def instruct_rows():
    rng = random.Random(0)
    rows = []
    for _ in range(N_INSTRUCT):
        words = [WORDS[int(rng.random() * len(WORDS))] for _ in range(3)]
        rows.append({"prompt": "reverse: " + " ".join(words), "response": " ".join(words[::-1])})
    return rows


@pytest.fixture(scope="module")
def instruct_task(tmp_path_factory, instruct_rows):
    folder = tmp_path_factory.mktemp("tiny_instruct")
    _write_jsonl(folder / "test.jsonl", instruct_rows)
    return LmEvalTask(name="tiny_instruct", format="instruction", data_dir=str(folder))


@pytest.fixture(scope="module")
def cls_rows():
    rng = random.Random(1)
    labels = [1] * N_GOOD + [0] * (N_CLS - N_GOOD)
    rows = []
    for i, label in enumerate(labels):
        words = [TEXT_WORDS[int(rng.random() * len(TEXT_WORDS))] for _ in range(4)]
        rows.append({"text": " ".join(words) + f" {WORDS[i % len(WORDS)]}.", "label": label})
    rng.shuffle(rows)
    return rows


@pytest.fixture(scope="module")
def cls_task(tmp_path_factory, cls_rows):
    folder = tmp_path_factory.mktemp("tiny_cls")
    _write_jsonl(folder / "test.jsonl", cls_rows)
    return LmEvalTask(name="tiny_cls", format="classification", data_dir=str(folder), label_names=LABELS)


FAST = dict(batch_size=6, max_gen_toks=5)


# -------------------------------------------------------------------------------- tests


def test_task_paths_are_absolute_and_formats_checked(monkeypatch, tmp_path):
    monkeypatch.chdir(tmp_path)
    task = LmEvalTask(name="t", format="instruction", data_dir="data")
    assert Path(task.data_dir).is_absolute() and task.data_dir == str(tmp_path / "data")
    with pytest.raises(ValueError, match="format"):
        LmEvalTask(name="t", format="regression", data_dir="data")
    with pytest.raises(ValueError, match="label_names"):
        LmEvalTask(name="t", format="classification", data_dir="data")


def test_contexts_start_exactly_as_in_training():
    # The harness trains on [BOS] + text (no other specials): lm-eval must see the same ids,
    # whatever the tokenizer's post-processor adds (`[CLS] $A [SEP]` here).
    from flexkd.data.encoding import causal_context

    for post_processor in (True, False):
        tok = _own_tokenizer(post_processor=post_processor)
        special = _special_tokens(tok)
        assert special.add_special_tokens is False
        assert special.context_prefix == tok.bos_token and special.prefix_token_id == tok.bos_token_id
        text = "reverse: a b c"
        seen = tok(special.context_prefix + text, add_special_tokens=False)["input_ids"]
        assert seen == causal_context(tok, text)


def test_instruction_greedy_metrics_samples_and_state(model, tok, instruct_task, instruct_rows):
    model.train()
    model.model.layers[0].eval()  # a mixed state must come back exactly
    modes = [m.training for m in model.modules()]
    random.seed(7)
    torch.manual_seed(123)
    expected_draws = (random.random(), torch.rand(3))
    random.seed(7)
    torch.manual_seed(123)
    settings = LmEvalSettings(**FAST, limit=8)

    first = evaluate_causal_lm(model, tok, instruct_task, settings)

    assert [m.training for m in model.modules()] == modes
    # lm-eval reseeds the global RNGs; the bridge must hand them back untouched.
    assert random.random() == expected_draws[0] and torch.equal(torch.rand(3), expected_draws[1])
    metrics = first["metrics"]
    for key in ("rouge1", "rouge2", "rougeL"):
        assert 0.0 <= metrics[key] <= 100.0
    assert "rougeL_std" not in metrics and "num_seeds" not in metrics
    for key in ("perplexity_word", "perplexity_byte"):
        assert math.isfinite(metrics[key]) and metrics[key] > 1.0
    assert metrics["bits_per_byte"] == pytest.approx(math.log2(metrics["perplexity_byte"]))
    # Golden value: the rolled text is the response alone after one prefix token.
    assert metrics["perplexity_word"] == pytest.approx(
        _response_word_perplexity(model, tok, instruct_rows[:8]), rel=1e-4
    )
    assert first["num_examples"] == 8
    samples = first["samples"]
    assert len(samples) == 8
    for sample, row in zip(samples, instruct_rows, strict=False):
        assert sample["prompt"] == row["prompt"] and sample["reference"] == row["response"]
        assert isinstance(sample["output"], str)
    recorded = first["settings"]
    assert recorded["lm_eval_version"] == "0.4.13"
    assert recorded["batch_size"] == 6 and recorded["limit"] == 8 and recorded["max_gen_toks"] == 5
    assert recorded["sampling"] is False and recorded["seeds"] == []

    second = evaluate_causal_lm(model, tok, instruct_task, settings)
    assert second["metrics"] == first["metrics"]
    assert second["samples"] == first["samples"]


def _response_word_perplexity(model, tok, rows) -> float:
    special = _special_tokens(tok)
    prefix = special.prefix_token_id if special.prefix_token_id is not None else tok.bos_token_id
    modes = [(m, m.training) for m in model.modules()]
    model.eval()
    total_ll, total_words = 0.0, 0
    with torch.no_grad():
        for row in rows:
            ids = [prefix] + tok(row["response"], add_special_tokens=False)["input_ids"]
            logprobs = torch.log_softmax(model(torch.tensor([ids])).logits[0].double(), dim=-1)
            total_ll += sum(logprobs[t - 1, ids[t]].item() for t in range(1, len(ids)))
            total_words += len(row["response"].split())
    for module, training in modes:
        module.training = training
    return math.exp(-total_ll / total_words)


@pytest.fixture
def scripted_generation(monkeypatch):
    """Replace HFLM generation by a script `doc -> output`; records the requests it saw."""
    from lm_eval.models.huggingface import HFLM

    seen = []

    def install(script):
        def generate_until(self, requests, disable_tqdm=False):
            seen.extend((req, self.tok_encode(req.args[0])) for req in requests)
            return [script(req.doc) for req in requests]

        monkeypatch.setattr(HFLM, "generate_until", generate_until)

    install.seen = seen
    return install


def test_rouge_is_computed_on_generated_outputs(model, tok, instruct_task, scripted_generation):
    settings = LmEvalSettings(**FAST, perplexity=False)
    scripted_generation(lambda doc: " " + doc["response"])  # a perfect model
    perfect = evaluate_causal_lm(model, tok, instruct_task, settings)
    assert perfect["metrics"] == pytest.approx({"rouge1": 100.0, "rouge2": 100.0, "rougeL": 100.0})
    assert all(s["output"] == s["reference"] for s in perfect["samples"])
    assert perfect["num_examples"] == N_INSTRUCT

    requests = scripted_generation.seen
    assert len(requests) == N_INSTRUCT
    for req, context_ids in requests:
        context, gen_kwargs = req.args
        assert context.endswith(format_prompt(req.doc["prompt"]))
        assert context_ids == _model_ids(tok, format_prompt(req.doc["prompt"]))
        assert gen_kwargs["until"] == [tok.eos_token]  # EOS only: "\n" does not end an answer
        assert gen_kwargs["do_sample"] is False and gen_kwargs["max_gen_toks"] == 5

    # First word wrong in every 3-word response: LCS 2 of 3 words, 1 of 2 bigrams.
    scripted_generation(lambda doc: " ".join([WRONG_WORD] + doc["response"].split()[1:]))
    wrong = evaluate_causal_lm(model, tok, instruct_task, settings)
    assert wrong["metrics"]["rougeL"] == pytest.approx(200 / 3)
    assert wrong["metrics"]["rouge1"] == pytest.approx(200 / 3)
    assert wrong["metrics"]["rouge2"] == pytest.approx(50.0)


def test_sampling_reports_mean_and_std_over_seeds(model, tok, instruct_task):
    settings = LmEvalSettings(**FAST, limit=6, sampling=True, temperature=1.0, seeds=[0, 1, 2])
    settings.perplexity = False
    report = evaluate_causal_lm(model, tok, instruct_task, settings)
    metrics = report["metrics"]
    assert metrics["num_seeds"] == 3
    per_seed = report["per_seed"]
    assert [p["seed"] for p in per_seed] == [0, 1, 2]
    for key in ("rouge1", "rouge2", "rougeL"):
        values = [p[key] for p in per_seed]
        assert metrics[key] == pytest.approx(sum(values) / 3)
        mean = sum(values) / 3
        assert metrics[f"{key}_std"] == pytest.approx(math.sqrt(sum((v - mean) ** 2 for v in values) / 2))
    # Sampling from a random model at T=1 does differ between seeds.
    assert len({p["rouge1"] for p in per_seed}) > 1 or metrics["rouge1_std"] > 0
    assert report["settings"]["seeds"] == [0, 1, 2] and report["settings"]["temperature"] == 1.0


def _favouring(tok, word: str):
    """The tiny Llama with a +30 logit bonus on `word`'s token at every position."""
    biased = _tiny_llama(tok, seed=1)
    (token_id,) = tok(word, add_special_tokens=False)["input_ids"]
    bonus = torch.zeros(len(tok))
    bonus[token_id] = 30.0
    biased.lm_head.register_forward_hook(lambda module, args, out: out + bonus)
    return biased


def test_classification_is_multiple_choice_over_label_words(tok, cls_task, cls_rows, monkeypatch):
    from lm_eval.models.huggingface import HFLM

    scored = []
    original = HFLM._loglikelihood_tokens

    def spy(self, requests, *args, **kwargs):
        scored.extend(requests)
        return original(self, requests, *args, **kwargs)

    monkeypatch.setattr(HFLM, "_loglikelihood_tokens", spy)
    settings = LmEvalSettings(batch_size=8)
    good = evaluate_causal_lm(_favouring(tok, "good"), tok, cls_task, settings)

    # Every example is scored once per label; the continuation is exactly the label word's
    # token(s) after the context, never a special token the tokenizer appends.
    assert len(scored) == 2 * N_CLS
    contexts = {format_classification_context(row["text"]) for row in cls_rows}
    context_ids = [_model_ids(tok, c) for c in contexts]
    label_ids = {name: tok(name, add_special_tokens=False)["input_ids"] for name in LABELS}
    for (context, continuation), context_enc, continuation_enc in scored:
        name = continuation[1:]
        assert continuation == format_label_choice(name) and name in LABELS
        assert continuation_enc == label_ids[name]
        assert any(context.endswith(c) for c in contexts) and context_enc in context_ids

    share_good = N_GOOD / N_CLS
    assert good["metrics"]["acc"] == pytest.approx(share_good)
    assert good["metrics"]["acc_norm"] == pytest.approx(share_good)
    assert all(s["output"] == "good" for s in good["samples"])
    references = [LABELS[row["label"]] for row in cls_rows]
    assert [s["reference"] for s in good["samples"]] == references

    bad = evaluate_causal_lm(_favouring(tok, "bad"), tok, cls_task, settings)
    assert bad["metrics"]["acc"] == pytest.approx(1 - share_good)


def test_classification_random_model_accuracy_in_range(model, tok, cls_task):
    model.eval()
    report = evaluate_causal_lm(model, tok, cls_task, LmEvalSettings(batch_size=8, limit=6))
    assert 0.0 <= report["metrics"]["acc"] <= 1.0 and 0.0 <= report["metrics"]["acc_norm"] <= 1.0
    assert report["num_examples"] == 6 and not model.training


def test_labels_the_tokenizer_cannot_tell_apart_are_refused(model, tok, cls_task):
    # Both unknown words encode to [UNK]: multiple choice would score them identically.
    task = LmEvalTask(
        name="tiny_cls", format="classification", data_dir=cls_task.data_dir, label_names=["xyzzy", "plugh"]
    )
    with pytest.raises(ValueError, match="same tokens"):
        evaluate_causal_lm(model, tok, task, LmEvalSettings())


def test_stock_task_names_are_checked_against_lm_eval(model, tok):
    with pytest.raises(ValueError, match="arc_easy"):  # the close match is suggested
        evaluate_stock_tasks(model, tok, ["arc_easyy"], LmEvalSettings(limit=2))
