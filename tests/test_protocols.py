"""The papers' protocols as configs: generation settings, multi-line references, the chat
prompt template, the paper pairs' optimisation presets, the pre-final-norm layer option."""

from __future__ import annotations

import copy
import json
from pathlib import Path

import pytest
import torch
from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf

from flexkd.data.encoding import causal_context, encode_instruction
from flexkd.data.formatting import format_prompt, render_prompt
from flexkd.data.tasks import TaskSpec
from flexkd.errors import ConfigError
from flexkd.evaluation.evaluate import context_window, lm_eval_settings
from flexkd.evaluation.lm_eval_bridge import (
    LmEvalSettings,
    LmEvalTask,
    _generation_config,
    _special_tokens,
    evaluate_causal_lm,
    generation_kwargs,
)
from flexkd.fixtures import fixture_path
from flexkd.models import CausalLM, build_model, final_norm, transformer_blocks
from flexkd.validation import check_schema

CONF = Path(__file__).resolve().parents[1] / "conf"
# A chat template in the Llama-2 style that writes BOS itself (which must not appear twice).
CHAT_TEMPLATE = ("{{ bos_token }}{% for m in messages %}{{ m['role'] }} : {{ m['content'] }} . "
                 "{% endfor %}{% if add_generation_prompt %}answer :{% endif %}")


@pytest.fixture(scope="module")
def tok():
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(fixture_path("tiny_tokenizer")))


def _tiny_llama(tok, layers: int = 2):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    return LlamaForCausalLM(LlamaConfig(
        hidden_size=32, num_hidden_layers=layers, num_attention_heads=4, num_key_value_heads=2,
        intermediate_size=64, vocab_size=len(tok), max_position_embeddings=128,
        pad_token_id=tok.pad_token_id, bos_token_id=tok.bos_token_id,
        eos_token_id=tok.eos_token_id))


def _write_task(folder: Path, rows: list[dict]) -> LmEvalTask:
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "test.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return LmEvalTask(name="multi", format="instruction", data_dir=str(folder))


# ------------------------------------------------------------------ generation settings

def test_generation_kwargs_default_to_eos_only_and_pass_sampling_explicitly():
    greedy = generation_kwargs(LmEvalSettings(max_gen_toks=7), "</s>", sample=False)
    assert greedy == {"until": ["</s>"], "max_gen_toks": 7, "do_sample": False}

    sampled = generation_kwargs(LmEvalSettings(sampling=True), "</s>", sample=True)
    # top_k=0 reaches generate (HF's own default would be 50), as do top_p and temperature.
    assert sampled == {"until": ["</s>"], "max_gen_toks": 64, "do_sample": True,
                       "temperature": 1.0, "top_k": 0, "top_p": 1.0}
    assert LmEvalSettings().seeds == [10, 20, 30, 40, 50]

    first_line = generation_kwargs(LmEvalSettings(until=["\n"]), "</s>", sample=False)
    assert first_line["until"] == ["\n", "</s>"]


def test_eos_only_generation_is_not_cut_at_a_newline():
    """lm-eval's own stop handling, fed the bridge's kwargs: a newline stays in the answer."""
    from lm_eval.models.utils import handle_stop_sequences, postprocess_generated_text

    kwargs = generation_kwargs(LmEvalSettings(), "</s>", sample=False)
    until = handle_stop_sequences(kwargs["until"], eos="</s>")
    assert until == ["</s>"]
    text = postprocess_generated_text("red cat\nblue dog</s>tail", until, None)
    assert text == "red cat\nblue dog"
    # With the old setting the answer would have ended at its first line.
    old = handle_stop_sequences(["\n"], eos="</s>")
    assert postprocess_generated_text("red cat\nblue dog</s>", old, None) == "red cat"


def test_bad_generation_settings_name_their_key():
    for key, value in (("top_k", -1), ("top_p", 0.0), ("top_p", 1.5), ("temperature", 0.0),
                       ("max_gen_toks", 0)):
        cfg = OmegaConf.to_container(OmegaConf.load(CONF / "eval" / "default.yaml"))
        cfg[key] = value
        with pytest.raises(ConfigError, match=f"eval.{key}="):
            lm_eval_settings(cfg)


def test_max_new_tokens_come_from_the_task_unless_eval_overrides(tmp_path):
    cfg = OmegaConf.to_container(OmegaConf.load(CONF / "eval" / "default.yaml"))
    task = TaskSpec("t", "instruction", tmp_path, max_length=48, max_new_tokens=16)
    assert cfg["max_gen_toks"] is None and lm_eval_settings(cfg, task).max_gen_toks == 16
    assert lm_eval_settings(cfg).max_gen_toks == 64
    assert lm_eval_settings({**cfg, "max_gen_toks": 5}, task).max_gen_toks == 5
    # The lm-eval window holds a training-length context plus the answer, within positions.
    backbone = type("B", (), {"config": type("C", (), {"max_position_embeddings": 128})()})()
    assert context_window(lm_eval_settings(cfg, task), task, backbone) == 48 + 16
    long = TaskSpec("t", "instruction", tmp_path, max_length=120, max_new_tokens=16)
    assert context_window(lm_eval_settings(cfg, long), long, backbone) == 128
    with pytest.raises(ConfigError, match="max_new_tokens=200"):
        context_window(lm_eval_settings({**cfg, "max_gen_toks": 200}, long), long, backbone)


def test_instruction_tasks_report_rougeL_and_new_task_keys_pass_the_schema():
    for name in ("bbc_headline", "tiny_instruct"):
        task = OmegaConf.load(CONF / "task" / f"{name}.yaml")
        assert task.main_metric == "rougeL" and task.prompt_template == "plain"
        assert task.max_new_tokens >= 1
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        cfg = compose("config", overrides=["pair=tiny_causal", "task=tiny_instruct"])
    check_schema(cfg)


# ------------------------------------------------------------- multi-line references

MULTI = [{"prompt": "reverse: cat red", "response": "red cat\nblue dog"},
         {"prompt": "reverse: dog sun", "response": "sun dog\nmoon tree\n"}]


def test_multi_line_reference_reaches_the_scorer_whole(tmp_path):
    task = _write_task(tmp_path / "multi", MULTI)
    config = _generation_config(task, LmEvalSettings(), "</s>", False, "<s>")
    assert config["doc_to_target"](MULTI[0]) == "red cat\nblue dog"
    score = config["process_results"]
    assert score(MULTI[0], ["red cat\nblue dog"])["rougeL"] == pytest.approx(100.0)
    # The first line alone matches 2 of 4 reference words: P=1, R=1/2, F=2/3. Were the
    # reference cut at its newline, this would score 100.
    assert score(MULTI[0], ["red cat"])["rougeL"] == pytest.approx(200 / 3)
    assert config["generation_kwargs"]["until"] == ["</s>"]


def test_multi_line_answers_score_whole_through_lm_eval(tmp_path, tok, monkeypatch):
    """Through simple_evaluate, with generation scripted: the reference and the output keep
    every line, and eval_settings records every generation setting."""
    from lm_eval.models.huggingface import HFLM

    task = _write_task(tmp_path / "multi", MULTI)
    seen = []

    def generate_until(self, requests, disable_tqdm=False):
        seen.extend(req.args[1] for req in requests)
        return [req.doc["response"].split("\n")[0] if "cat" in req.doc["prompt"]
                else req.doc["response"] for req in requests]

    monkeypatch.setattr(HFLM, "generate_until", generate_until)
    settings = LmEvalSettings(batch_size=2, max_gen_toks=9, perplexity=False, sampling=True,
                              seeds=[10, 20])
    report = evaluate_causal_lm(_tiny_llama(tok), tok, task, settings)
    # Example 1 answered with its first line only (2/3), example 2 whole (100).
    assert report["metrics"]["rougeL"] == pytest.approx((200 / 3 + 100) / 2)
    assert report["metrics"]["rougeL_std"] == 0.0 and report["metrics"]["num_seeds"] == 2
    assert report["samples"][1]["reference"] == "sun dog\nmoon tree"
    assert all(kw == {"until": [tok.eos_token], "max_gen_toks": 9, "do_sample": True,
                      "temperature": 1.0, "top_k": 0, "top_p": 1.0} for kw in seen)
    recorded = report["settings"]
    assert recorded["until"] == [] and recorded["max_new_tokens"] == 9
    assert recorded["top_k"] == 0 and recorded["top_p"] == 1.0 and recorded["temperature"] == 1.0
    assert recorded["seeds"] == [10, 20] and recorded["sampling"] is True
    assert recorded["greedy"] is False and recorded["generation_kwargs"] == seen[0]
    assert recorded["prompt_template"] == "plain"
    json.dumps(recorded)  # results.json material


def test_sampling_kwargs_reach_hf_generate(tmp_path, tok, monkeypatch):
    """The real HFLM path down to model.generate: top_k=0 and top_p=1 arrive explicitly."""
    task = _write_task(tmp_path / "multi", MULTI)
    model = _tiny_llama(tok)
    calls = []
    real = model.generate

    def generate(*args, **kwargs):
        calls.append(kwargs)
        return real(*args, **kwargs)

    monkeypatch.setattr(model, "generate", generate)
    settings = LmEvalSettings(batch_size=2, max_gen_toks=3, perplexity=False, sampling=True,
                              seeds=[10], max_length=64)
    evaluate_causal_lm(model, tok, task, settings)
    assert calls and all(c["do_sample"] is True and c["top_k"] == 0 and c["top_p"] == 1.0
                         and c["temperature"] == 1.0 for c in calls)


# ----------------------------------------------------------------------- chat template

def test_chat_template_is_one_format_for_training_and_lm_eval(tok, tmp_path):
    chat_tok = copy.deepcopy(tok)
    chat_tok.chat_template = CHAT_TEMPLATE
    prompt = "reverse: cat red"
    rendered = render_prompt(prompt, chat_tok, "chat")
    assert rendered == "user : reverse: cat red . answer :"  # BOS left to causal_context
    row = {"prompt": prompt, "response": "red cat"}
    enc = encode_instruction(row, chat_tok, 64, "x:1", prompt_template="chat")
    context = causal_context(chat_tok, rendered)
    assert context.count(chat_tok.bos_token_id) == 1
    response = chat_tok("red cat", add_special_tokens=False)["input_ids"] + [chat_tok.eos_token_id]
    assert enc.input_ids == context + response
    assert enc.labels == [-100] * len(context) + response

    # lm-eval's context for the same row: the same ids as the training prompt.
    task = _write_task(tmp_path / "chat", [row])
    task.prompt_template = "chat"
    special = _special_tokens(chat_tok)
    config = _generation_config(task, LmEvalSettings(), chat_tok.eos_token, False,
                                special.context_prefix, chat_tok)
    lm_context = config["doc_to_text"](row)
    assert chat_tok(lm_context, add_special_tokens=False)["input_ids"] == context

    # plain stays the old format
    assert render_prompt(prompt, chat_tok, "plain") == format_prompt(prompt)
    with pytest.raises(ConfigError, match="task.prompt_template=chat needs a tokenizer"):
        render_prompt(prompt, tok, "chat")


def test_chat_template_changes_the_task_fingerprint(tmp_path):
    plain = TaskSpec("t", "instruction", tmp_path)
    chat = TaskSpec("t", "instruction", tmp_path, prompt_template="chat")
    assert "prompt_template" not in plain.fingerprint()  # old cache keys stay valid
    assert chat.fingerprint()["prompt_template"] == "chat"


# ---------------------------------------------------------------- paper pair presets

def _compose(*overrides: str):
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        return compose("config", overrides=list(overrides))


def _common_optim(cfg, lr: float, epochs: int) -> None:
    assert cfg.optim.lr == lr and cfg.optim.weight_decay == 0.01
    assert cfg.trainer.max_epochs == epochs and cfg.trainer.max_steps == -1
    assert cfg.trainer.gradient_clip_val == 1.0
    assert cfg.teacher_finetune.enabled and cfg.teacher_finetune.trainable_layers is None
    assert cfg.teacher_finetune.max_steps == -1


def test_gpt2xl_gpt2_carries_minillm_recipe():
    cfg = _compose("pair=gpt2xl_gpt2", "task=bbc_headline")
    _common_optim(cfg, 5e-4, 20)
    assert cfg.teacher_finetune.lr == 5e-5 and cfg.teacher_finetune.max_epochs == 10
    assert cfg.task.max_length == 512
    ev = cfg.eval
    assert ev.sampling and list(ev.seeds) == [10, 20, 30, 40, 50] and list(ev.until) == []
    assert ev.top_k == 0 and ev.top_p == 1.0 and ev.temperature == 1.0 and ev.max_gen_toks == 512
    assert cfg.strategy.name == "flexkd" and cfg.strategy.alpha == 1.0  # KD ratio: logit KD only
    check_schema(cfg)
    kd = _compose("pair=gpt2xl_gpt2", "task=bbc_headline", "strategy=logit_kd")
    assert kd.strategy.alpha == 0.5 and kd.strategy.gamma == 0.5
    check_schema(kd)
    # Command-line keys win over the preset; ~preset drops it.
    smoke = _compose("pair=gpt2xl_gpt2", "trainer.max_steps=4", "teacher_finetune.max_steps=4")
    assert smoke.trainer.max_steps == 4 and smoke.teacher_finetune.max_steps == 4
    bare = _compose("pair=gpt2xl_gpt2", "~preset")
    assert bare.teacher_finetune.lr == 1e-3 and bare.trainer.max_steps == 150


def test_bert_base_mini_carries_the_glue_recipe():
    cfg = _compose("pair=bert_base_mini", "task=rt_polarity")
    _common_optim(cfg, 5e-5, 3)
    assert cfg.teacher_finetune.lr == 5e-5 and cfg.teacher_finetune.max_epochs == 3
    assert cfg.data.batch_size == 32 and cfg.teacher_finetune.batch_size == 32
    assert cfg.task.max_length == 128
    check_schema(cfg)
    imdb = _compose("pair=bert_base_mini", "task=imdb")
    assert imdb.data.batch_size == 16 and imdb.teacher_finetune.batch_size == 16
    check_schema(imdb)


def test_llama7b_sheared1b_trains_at_a_llama_lr():
    cfg = _compose("pair=llama7b_sheared1b", "task=bbc_headline", "strategy=logit_kd",
                   "trainer=gpu")
    _common_optim(cfg, 1e-5, 10)
    assert cfg.teacher_finetune.lr == 1e-5 and cfg.trainer.accelerator == "gpu"
    assert cfg.strategy.alpha == 0.5 and cfg.strategy.gamma == 0.5 and cfg.eval.sampling
    check_schema(cfg)


def test_pruned_smollm2_pairs_carry_a_cpu_budget_for_headlines():
    for pair in ("smollm2_w384", "smollm2_w288", "smollm2_w192"):
        cfg = _compose(f"pair={pair}", "task=bbc_headline")
        assert cfg.task.prompt_template == "chat" and cfg.task.max_length == 192
        assert cfg.task.max_prompt_words == 80
        assert cfg.task.max_train_examples == 512 and cfg.trainer.max_steps == 160
        assert cfg.eval.select_checkpoint == "best_val_rougeL" and cfg.eval.limit == 64
        # Every block of the teacher is fine-tuned (the top two alone left it answering nothing).
        assert cfg.teacher_finetune.trainable_layers is None and cfg.teacher_finetune.lr == 1e-4
        assert cfg.pair.student.heal.steps == 150  # the pruned student is healed first
        check_schema(cfg)
    # Other tasks keep the defaults; experiments and command-line keys win over the preset.
    cls = _compose("pair=smollm2_w288", "task=rt_polarity")
    assert cls.trainer.max_steps == 150 and cls.task.max_length != 192
    exp = _compose("experiment=paper_instruction", "trainer.max_steps=4")
    assert exp.trainer.max_steps == 4 and exp.eval.sampling and exp.eval.max_gen_toks is None
    assert exp.task.prompt_template == "chat" and exp.eval.select_checkpoint == "best_val_rougeL"
    # The SmolLM2 width arms run at the same budget, so they share one teacher.
    arm = _compose("experiment=paper_width_ratio", "+width_arm=smollm2_r3")
    assert arm.pair.name == "smollm2_w192" and arm.task.max_train_examples == 512


def test_other_pairs_keep_the_defaults():
    cfg = _compose("pair=tiny_causal", "task=tiny_instruct")
    assert cfg.teacher_finetune.lr == 1e-3 and cfg.trainer.max_steps == 150
    assert "max_epochs" not in cfg.teacher_finetune and not cfg.eval.sampling


# ------------------------------------------------------------ pre-final-norm layer

def _last_block_output(model: CausalLM, inputs) -> torch.Tensor:
    captured = {}
    block = transformer_blocks(model.backbone)[-1]
    handle = block.register_forward_hook(
        lambda m, a, out: captured.__setitem__("out", out[0] if isinstance(out, tuple) else out))
    try:
        model(inputs)
    finally:
        handle.remove()
    return captured["out"]


LLAMA = {"model_type": "llama", "hidden_size": 32, "num_hidden_layers": 2, "num_attention_heads": 4,
         "num_key_value_heads": 2, "intermediate_size": 64, "max_position_embeddings": 64}
GPT2 = {"model_type": "gpt2", "n_embd": 32, "n_layer": 2, "n_head": 4, "n_positions": 64}


@pytest.mark.parametrize("init", [LLAMA, GPT2], ids=["llama", "gpt2"])
def test_pre_norm_state_is_the_last_blocks_output(tok, init):
    spec = {"name": "tiny", "init": {**init, "bos_token_id": 2, "eos_token_id": 6}}
    post = build_model(spec, "instruction", tok)
    pre = build_model({**spec, "final_norm_state": "pre"}, "instruction", tok)
    assert post.final_norm_state == "post" and pre.final_norm_state == "pre"
    post.eval(), pre.eval()  # GPT-2 has dropout
    ids = torch.tensor([[2, 5, 6, 7, 8], [2, 9, 10, 11, 12]])
    inputs = {"input_ids": ids, "attention_mask": torch.ones_like(ids)}
    with torch.no_grad():
        after = post(inputs, layers=(2, 1)).hidden
        before = pre(inputs, layers=(2, 1)).hidden
        block_out = _last_block_output(pre, inputs)
        norm = final_norm(pre.backbone)
        torch.testing.assert_close(before[2], block_out, rtol=0, atol=0)
        torch.testing.assert_close(after[2], norm(before[2]), rtol=0, atol=0)
        assert not torch.allclose(before[2], after[2])
        torch.testing.assert_close(before[1], after[1], rtol=0, atol=0)  # other layers as before
    # Gradients flow through the pre-norm state (a feature loss can train the last block).
    pre(inputs, layers=(2,)).hidden[2].sum().backward()
    assert all(p.grad is not None for p in transformer_blocks(pre.backbone)[-1].parameters())
    # Back to post: the hook is gone.
    pre.use_final_norm_state("post")
    with torch.no_grad():
        torch.testing.assert_close(pre(inputs, layers=(2,)).hidden[2], after[2], rtol=0, atol=0)


def test_pre_norm_needs_a_final_norm_and_passes_the_schema(tok):
    spec = {"name": "enc", "final_norm_state": "pre",
            "init": {"model_type": "bert", "hidden_size": 32, "num_hidden_layers": 1,
                     "num_attention_heads": 4, "intermediate_size": 64}}
    with pytest.raises(ConfigError, match="final_norm_state=pre: BertModel has no final norm"):
        build_model(spec, "classification", tok, label_names=["a", "b"])
    cfg = _compose("pair=tiny_causal", "task=tiny_instruct", "+pair.teacher.final_norm_state=pre")
    check_schema(cfg)
    with pytest.raises(ConfigError, match="final_norm_state"):
        check_schema(_compose("pair=tiny_causal", "+pair.teacher.final_norm_state=middle"))


# ------------------------------------------------------- checkpoint selection (ROUGE-L)

def test_best_validation_rouge_keeps_the_best_weights(tok, tmp_path, monkeypatch):
    from types import SimpleNamespace

    from lm_eval.models.huggingface import HFLM

    from flexkd.evaluation.selection import BestValidationRouge, checkpoint_selection

    folder = tmp_path / "sel"
    folder.mkdir()
    val = [{"prompt": "reverse: cat red", "response": "red cat"},
           {"prompt": "reverse: dog sun", "response": "sun dog"}]
    (folder / "validation.jsonl").write_text("".join(json.dumps(r) + "\n" for r in val))
    task = TaskSpec("sel", "instruction", folder, max_length=48, max_new_tokens=8)
    model = CausalLM(_tiny_llama(tok))
    eval_cfg = OmegaConf.merge(OmegaConf.load(CONF / "eval" / "default.yaml"),
                               {"select_checkpoint": "best_val_rougeL", "val_every_n_steps": 2})
    callback = checkpoint_selection(eval_cfg, model, tok, task)
    assert isinstance(callback, BestValidationRouge) and callback.every_n_steps == 2

    # The "model" answers the first validation example right at steps 2 and 6, both at step 4.
    answers = {2: 1, 4: 2, 6: 1}
    state = {"step": 0}

    def generate_until(self, requests, disable_tqdm=False):
        right = answers[state["step"]]
        return [req.doc["response"] if i < right else "zebra" for i, req in enumerate(requests)]

    monkeypatch.setattr(HFLM, "generate_until", generate_until)
    trainer = SimpleNamespace(global_step=0, is_global_zero=True)
    marks = {}
    for step in range(1, 7):
        with torch.no_grad():  # a "training step": move one weight
            model.backbone.lm_head.weight[0, 0] = float(step)
        marks[step] = float(step)
        trainer.global_step = state["step"] = step
        callback.on_train_batch_end(trainer, None, None, None, step)
    callback.on_train_end(trainer, None)  # step 6 already scored: not scored twice
    assert [h["step"] for h in callback.history] == [2, 4, 6]
    assert [h["rougeL"] for h in callback.history] == pytest.approx([50.0, 100.0, 50.0])
    assert model.backbone.lm_head.weight[0, 0].item() == marks[4]  # the best step's weights
    summary = callback.summary()
    assert summary["best_step"] == 4 and summary["best_val_rougeL"] == pytest.approx(100.0)

    # Its state survives a checkpoint round trip (resume keeps the best so far).
    again = BestValidationRouge(model, tok, task, eval_cfg, 2)
    again.load_state_dict(callback.state_dict())
    assert again.summary() == summary

    assert checkpoint_selection(OmegaConf.load(CONF / "eval" / "default.yaml"), model, tok, task) is None
    with pytest.raises(ConfigError, match="eval.select_checkpoint='best'"):
        checkpoint_selection({"select_checkpoint": "best"}, model, tok, task)
    cls = TaskSpec("c", "classification", folder, label_names=["a", "b"])
    with pytest.raises(ConfigError, match="needs an instruction task"):
        checkpoint_selection(eval_cfg, model, tok, cls)
