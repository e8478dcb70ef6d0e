"""Structural pruning (flexkd.pruning) on tiny random-init Llama, BERT and MPNet models."""

from __future__ import annotations

import json
import math

import pytest
import torch
from transformers import (
    AutoModel,
    AutoModelForCausalLM,
    BertConfig,
    BertModel,
    LlamaConfig,
    LlamaForCausalLM,
    LlamaModel,
    MPNetConfig,
    MPNetModel,
)

from flexkd.errors import ConfigError
from flexkd.models import SequenceClassifier
from flexkd.pruning import RECORD_FILE, PrunePlan, build_pruned, choose_heads, prune, save_pruned, top_sorted

VOCAB = 100


def llama(tied=False, layers=3, seed=0) -> LlamaForCausalLM:
    torch.manual_seed(seed)
    cfg = LlamaConfig(hidden_size=64, num_attention_heads=4, num_key_value_heads=2,
                      num_hidden_layers=layers, intermediate_size=96, vocab_size=VOCAB,
                      tie_word_embeddings=tied, max_position_embeddings=64)
    return LlamaForCausalLM(cfg).eval()


def bert(seed=0) -> BertModel:
    torch.manual_seed(seed)
    cfg = BertConfig(hidden_size=32, num_attention_heads=4, num_hidden_layers=2, intermediate_size=48,
                     vocab_size=VOCAB, max_position_embeddings=64)
    return BertModel(cfg).eval()


def mpnet(seed=0) -> MPNetModel:
    torch.manual_seed(seed)
    cfg = MPNetConfig(hidden_size=32, num_attention_heads=4, num_hidden_layers=2, intermediate_size=48,
                      vocab_size=VOCAB, max_position_embeddings=64)
    return MPNetModel(cfg).eval()


def batches(n=3, seed=1):
    gen = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(n):
        ids = torch.randint(3, VOCAB, (2, 12), generator=gen)
        mask = torch.ones_like(ids)
        mask[1, 9:] = 0  # one padded row
        out.append({"input_ids": ids, "attention_mask": mask})
    return out


@torch.no_grad()
def outputs(model, batch):
    out = model(**batch)
    return out.logits if hasattr(out, "logits") else out.last_hidden_state


FULL = {"llama": dict(hidden_size=64, num_heads=4, num_kv_heads=2, intermediate_size=96,
                      keep_layers=[0, 1, 2]),
        "bert": dict(hidden_size=32, num_heads=4, intermediate_size=48, keep_layers=[0, 1]),
        "mpnet": dict(hidden_size=32, num_heads=4, intermediate_size=48, keep_layers=[0, 1])}
MAKERS = {"llama": llama, "bert": bert, "mpnet": mpnet}


@pytest.mark.parametrize("family", ["llama", "bert", "mpnet"])
@pytest.mark.parametrize("rank_by", ["activation", "random"])
def test_keeping_everything_reproduces_the_model_exactly(family, rank_by):
    model = MAKERS[family]()
    pruned = build_pruned(model, PrunePlan(**FULL[family], rank_by=rank_by), batches())
    assert pruned is not model
    batch = batches(1, seed=7)[0]
    assert torch.equal(outputs(pruned, batch), outputs(model, batch))
    assert pruned.flexkd_pruning["parameters"]["before"] == pruned.flexkd_pruning["parameters"]["after"]


def test_keeping_everything_in_a_tied_llama_and_a_classifier_is_exact():
    model = llama(tied=True)
    pruned = build_pruned(model, PrunePlan(**FULL["llama"]), batches())
    batch = batches(1, seed=7)[0]
    assert torch.equal(outputs(pruned, batch), outputs(model, batch))
    torch.manual_seed(0)
    clf = SequenceClassifier(bert(), 3).eval()
    inputs = batches(1, seed=7)[0]
    same = build_pruned(clf, PrunePlan(**FULL["bert"]), batches())
    with torch.no_grad():
        assert torch.equal(same(inputs).logits, clf(inputs).logits)


@pytest.mark.parametrize("tied", [False, True])
def test_pruned_llama_reloads_from_its_directory_with_identical_outputs(tmp_path, tied):
    plan = PrunePlan(hidden_size=40, num_heads=2, intermediate_size=64, keep_layers=[0, 2])
    pruned = build_pruned(llama(tied=tied), plan, batches())
    c = pruned.config
    assert (c.hidden_size, c.num_attention_heads, c.num_key_value_heads, c.head_dim,
            c.intermediate_size, c.num_hidden_layers) == (40, 2, 2, 16, 64, 2)
    assert (pruned.lm_head.weight is pruned.model.embed_tokens.weight) == tied
    out = save_pruned(pruned, None, tmp_path / "student", pruned.flexkd_pruning)
    reloaded = AutoModelForCausalLM.from_pretrained(out).eval()
    batch = batches(1, seed=7)[0]
    assert torch.equal(outputs(reloaded, batch), outputs(pruned, batch))
    assert (reloaded.lm_head.weight is reloaded.model.embed_tokens.weight) == tied
    record = json.loads((out / RECORD_FILE).read_text())
    assert record["plan"]["hidden_size"] == 40 and record["kept"]["layers"] == [0, 2]
    hidden = record["kept"]["hidden"]
    assert len(hidden) == 40 and hidden == sorted(hidden)
    assert [len(h) for h in record["kept"]["heads"]] == [2, 2]
    assert [len(ch) for ch in record["kept"]["intermediate"]] == [64, 64]
    assert record["parameters"]["after"] == sum(p.numel() for p in reloaded.parameters())
    assert record["parameters"]["before"] == sum(p.numel() for p in llama(tied=tied).parameters())


@pytest.mark.parametrize("tied", [False, True])
def test_a_width_the_heads_do_not_divide_reloads_as_mistral_with_identical_outputs(tmp_path, tied):
    """d 42 with 4 heads (SmolLM2's case: d 384 with 9 heads), which transformers' LlamaConfig
    refuses to write or load even with head_dim given: the directory holds the same decoder as
    MistralForCausalLM, and it prunes again as a Llama-family model."""
    pruned = build_pruned(llama(tied=tied), PrunePlan(hidden_size=42, keep_layers=[0, 2]), batches())
    assert (pruned.config.hidden_size, pruned.config.num_attention_heads) == (42, 4)
    out = save_pruned(pruned, None, tmp_path / "student", pruned.flexkd_pruning)
    reloaded = AutoModelForCausalLM.from_pretrained(out).eval()
    assert type(reloaded).__name__ == "MistralForCausalLM"
    assert (reloaded.config.head_dim, reloaded.config.sliding_window) == (16, None)
    assert (reloaded.lm_head.weight is reloaded.model.embed_tokens.weight) == tied
    for batch in batches(2, seed=7):  # the second row is padded
        assert torch.equal(outputs(reloaded, batch), outputs(pruned, batch))
    again = build_pruned(reloaded, PrunePlan(hidden_size=30, num_heads=2), batches())
    assert (again.config.hidden_size, again.config.num_attention_heads) == (30, 2)


def test_a_biased_llama_at_a_width_its_heads_do_not_divide_is_refused(tmp_path):
    model = llama()
    model.config.attention_bias = True  # Mistral has no attention biases to carry them
    pruned = build_pruned(model, PrunePlan(hidden_size=42, rank_by="random"))
    with pytest.raises(ConfigError, match="hidden_size that the head count divides"):
        save_pruned(pruned, None, tmp_path / "student", pruned.flexkd_pruning)
    assert not (tmp_path / "student").exists()


@pytest.mark.parametrize("family,plan", [
    ("bert", PrunePlan(hidden_size=16, intermediate_size=20)),               # 4 heads of size 4
    ("mpnet", PrunePlan(hidden_size=16, num_heads=2, keep_layers=[1])),      # 2 heads of size 8
    ("mpnet", PrunePlan(hidden_size=8, rank_by="random", seed=3)),           # 4 heads of size 2
])
def test_pruned_encoders_reload_from_their_directory_with_identical_outputs(tmp_path, family, plan):
    pruned = build_pruned(MAKERS[family](), plan, batches())
    heads = plan.num_heads or 4
    assert pruned.config.hidden_size == plan.hidden_size and pruned.config.num_attention_heads == heads
    out = save_pruned(pruned, None, tmp_path / "enc", pruned.flexkd_pruning)
    reloaded = AutoModel.from_pretrained(out).eval()
    batch = batches(1, seed=7)[0]
    assert torch.isfinite(outputs(pruned, batch)).all()
    assert torch.equal(outputs(reloaded, batch), outputs(pruned, batch))


def test_kept_dims_are_the_top_of_the_given_scores_in_index_order():
    scores = torch.zeros(64)
    scores[[40, 5, 63, 3, 17]] = torch.tensor([5.0, 4.0, 3.0, 2.0, 1.0])
    model = llama()
    pruned = build_pruned(model, PrunePlan(hidden_size=4, rank_by="scores"), scores=scores)
    kept = [3, 5, 40, 63]  # top 4 of the scores (17 is fifth), sorted by index
    assert pruned.flexkd_pruning["kept"]["hidden"] == kept
    assert pruned.flexkd_pruning["ranked"] == {"hidden": "scores"}
    idx = torch.tensor(kept)
    assert torch.equal(pruned.model.embed_tokens.weight, model.model.embed_tokens.weight[:, idx])
    assert torch.equal(pruned.lm_head.weight, model.lm_head.weight[:, idx])
    a, b = pruned.model.layers[1], model.model.layers[1]
    assert torch.equal(a.self_attn.q_proj.weight, b.self_attn.q_proj.weight[:, idx])
    assert torch.equal(a.self_attn.o_proj.weight, b.self_attn.o_proj.weight[idx])
    assert torch.equal(a.mlp.down_proj.weight, b.mlp.down_proj.weight[idx])
    assert torch.equal(a.post_attention_layernorm.weight, b.post_attention_layernorm.weight[idx])
    # Heads and MLP untouched: head_dim stays 16 although 4 is not a multiple of 4 heads x 16.
    assert pruned.config.head_dim == 16 and a.self_attn.q_proj.weight.shape == (64, 4)
    assert torch.isfinite(outputs(pruned, batches(1)[0])).all()


def test_top_sorted_breaks_ties_by_lower_index():
    assert top_sorted(torch.tensor([1.0, 3.0, 3.0, 0.0, 3.0]), 2).tolist() == [1, 2]


def test_choose_heads_on_hand_made_scores():
    scores = torch.tensor([1.0, 5.0, 2.0, 2.0])  # groups: (0, 1) and (2, 3)
    q, kv = choose_heads(scores, num_kv_heads=2, heads=2, kv=1)
    assert q.tolist() == [0, 1] and kv.tolist() == [0]      # group 0 sums 6 > 4
    q, kv = choose_heads(scores, num_kv_heads=2, heads=2, kv=2)
    assert q.tolist() == [1, 2] and kv.tolist() == [0, 1]   # best of each group, tie -> lower
    q, kv = choose_heads(torch.tensor([0.0, 0.0, 9.0, 1.0]), num_kv_heads=2, heads=1, kv=1)
    assert q.tolist() == [2] and kv.tolist() == [1]


def _silence_heads(model: LlamaForCausalLM, heads: list[int]) -> None:
    """Zero the o_proj columns of `heads` in every layer: those heads write nothing."""
    hd = model.config.head_dim
    with torch.no_grad():
        for layer in model.model.layers:
            for h in heads:
                layer.self_attn.o_proj.weight[:, h * hd:(h + 1) * hd] = 0


@pytest.mark.parametrize("silent,plan,kept_heads,kept_kv", [
    ([2, 3], PrunePlan(num_heads=2, num_kv_heads=1), [0, 1], [0]),   # a whole KV group
    ([1, 2], PrunePlan(num_heads=2), [0, 3], [0, 1]),                 # one query head per group
])
def test_head_pruning_keeps_grouped_kv_consistent_and_silent_heads_go(silent, plan, kept_heads, kept_kv):
    model = llama()
    _silence_heads(model, silent)
    pruned = build_pruned(model, plan, batches())
    c = pruned.config
    assert c.num_attention_heads % c.num_key_value_heads == 0
    assert (c.num_attention_heads, c.num_key_value_heads) == (2, len(kept_kv))
    record = pruned.flexkd_pruning["kept"]
    assert record["heads"] == [kept_heads] * 3 and record["kv_heads"] == [kept_kv] * 3
    hd = 16
    for new, old in zip(pruned.model.layers, model.model.layers, strict=True):
        a, b = new.self_attn, old.self_attn
        assert a.q_proj.weight.shape == (2 * hd, 64) and a.o_proj.weight.shape == (64, 2 * hd)
        assert a.k_proj.weight.shape == a.v_proj.weight.shape == (len(kept_kv) * hd, 64)
        assert a.num_key_value_groups == 2 // len(kept_kv)
        q_rows = torch.cat([torch.arange(h * hd, (h + 1) * hd) for h in kept_heads])
        kv_rows = torch.cat([torch.arange(g * hd, (g + 1) * hd) for g in kept_kv])
        assert torch.equal(a.q_proj.weight, b.q_proj.weight[q_rows])
        assert torch.equal(a.k_proj.weight, b.k_proj.weight[kv_rows])
        assert torch.equal(a.v_proj.weight, b.v_proj.weight[kv_rows])
        assert torch.equal(a.o_proj.weight, b.o_proj.weight[:, q_rows])
    # The removed heads wrote nothing, so the kept heads (and the model) compute the same.
    batch = batches(1, seed=7)[0]
    torch.testing.assert_close(outputs(pruned, batch), outputs(model, batch), rtol=1e-5, atol=1e-6)


def test_head_counts_that_break_the_kv_groups_are_refused():
    with pytest.raises(ConfigError, match="num_heads=3"):
        build_pruned(llama(), PrunePlan(num_heads=3), batches())
    with pytest.raises(ConfigError, match="num_kv_heads=2"):
        build_pruned(llama(), PrunePlan(num_heads=1, num_kv_heads=2), batches())
    with pytest.raises(ConfigError, match="multiple of num_heads"):
        build_pruned(bert(), PrunePlan(hidden_size=30), batches())
    with pytest.raises(ConfigError, match="head size"):
        build_pruned(bert(), PrunePlan(num_heads=2), batches())


@pytest.mark.parametrize("family", ["llama", "bert"])
def test_mlp_channels_with_zero_down_columns_are_pruned_without_changing_outputs(family):
    model = MAKERS[family]()
    blocks = model.model.layers if family == "llama" else model.encoder.layer
    gen = torch.Generator().manual_seed(0)
    total, keep = (96, 64) if family == "llama" else (48, 30)
    live = []
    with torch.no_grad():
        for block in blocks:
            down = block.mlp.down_proj if family == "llama" else block.output.dense
            dead = torch.randperm(total, generator=gen)[:total - keep]
            down.weight[:, dead] = 0
            live.append(sorted(set(range(total)) - set(dead.tolist())))
    pruned = build_pruned(model, PrunePlan(intermediate_size=keep), batches())
    assert pruned.flexkd_pruning["kept"]["intermediate"] == live
    assert pruned.config.intermediate_size == keep
    batch = batches(1, seed=7)[0]
    torch.testing.assert_close(outputs(pruned, batch), outputs(model, batch), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("family", ["llama", "bert", "mpnet"])
def test_activation_ranking_picks_the_dims_made_large_on_purpose(family):
    model = MAKERS[family]()
    loud = [2, 11, 29]
    with torch.no_grad():
        for module in model.modules():
            weight = getattr(module, "weight", None)
            if "norm" in type(module).__name__.lower() and weight is not None:
                weight[loud] *= 50.0  # every norm output is 50x larger on these dims
    pruned = build_pruned(model, PrunePlan(hidden_size=3 if family == "llama" else 4,
                                           num_heads=None if family == "llama" else 1), batches())
    kept = pruned.flexkd_pruning["kept"]["hidden"]
    assert set(loud) <= set(kept)
    assert pruned.flexkd_pruning["ranked"]["hidden"] == "activation"


def test_random_ranking_is_seeded():
    picks = [build_pruned(llama(), PrunePlan(hidden_size=32, rank_by="random", seed=s)).flexkd_pruning
             for s in (0, 0, 1)]
    assert picks[0]["kept"] == picks[1]["kept"]
    assert picks[0]["kept"]["hidden"] != picks[2]["kept"]["hidden"]


def test_bare_llama_model_and_classifier_head_are_pruned_with_the_stream():
    base = LlamaModel(llama().config).eval()
    pruned = build_pruned(base, PrunePlan(hidden_size=32, rank_by="random"))
    assert pruned.norm.weight.shape == (32,)
    assert outputs(pruned, batches(1)[0]).shape == (2, 12, 32)
    torch.manual_seed(0)
    clf = SequenceClassifier(bert(), 3).eval()
    small = build_pruned(clf, PrunePlan(hidden_size=16, rank_by="random"))
    idx = torch.tensor(small.flexkd_pruning["kept"]["hidden"])
    assert torch.equal(small.head.weight, clf.head.weight[:, idx]) and small.hidden_size == 16
    with torch.no_grad():
        assert small(batches(1)[0]).logits.shape == (2, 3)


def test_bad_plans_say_what_to_change():
    with pytest.raises(ConfigError, match="exceeds"):
        build_pruned(llama(), PrunePlan(hidden_size=65, rank_by="random"))
    with pytest.raises(ConfigError, match="needs the per-dim scores"):
        build_pruned(llama(), PrunePlan(hidden_size=8, rank_by="scores"))
    with pytest.raises(ConfigError, match="has 10 entries|have 10 entries"):
        build_pruned(llama(), PrunePlan(hidden_size=8, rank_by="scores"), scores=torch.ones(10))
    with pytest.raises(ConfigError, match="calibration"):
        build_pruned(llama(), PrunePlan(hidden_size=8))
    with pytest.raises(ConfigError, match="unknown prune key"):
        PrunePlan.from_dict({"width": 8})
    with pytest.raises(ConfigError, match="rank_by"):
        PrunePlan(rank_by="magnitude")
    with pytest.raises(ConfigError, match="keep_layers"):
        build_pruned(llama(), PrunePlan(keep_layers=[2, 0], rank_by="random"))
    with pytest.raises(ConfigError, match="cannot prune"):
        prune(torch.nn.Linear(2, 2), PrunePlan())


@pytest.mark.parametrize("family", ["bert", "mpnet"])
def test_shrinking_encoder_heads_keeps_the_attention_temperature(family):
    """Head dims 4..7 of every head are silent (q rows and o columns zero); cutting each head to
    dims 0..3 must leave the model's function unchanged, which needs the q rescaling."""
    from flexkd.pruning import _layout, _prune_attention, activation_stats

    model = MAKERS[family]()
    layout = _layout(model)
    silent = torch.cat([torch.arange(h * 8 + 4, h * 8 + 8) for h in range(4)])
    with torch.no_grad():
        for block in layout.blocks:
            block.attention.q.weight[silent] = 0
            block.attention.q.bias[silent] = 0
            block.attention.o.weight[:, silent] = 0
    batch = batches(1, seed=7)[0]
    before = outputs(model, batch)
    stats = activation_stats(layout, batches())
    for i, block in enumerate(layout.blocks):
        assert (stats.q[i][silent] == 0).all() and (stats.q[i].view(4, 8)[:, :4] > 0).all()
        keep = [torch.arange(4)] * 4
        _prune_attention(block, layout, torch.arange(4), torch.arange(4), keep, keep)
        assert block.attention.q.weight.shape == (16, 32)
    torch.testing.assert_close(outputs(model, batch), before, rtol=1e-5, atol=1e-6)


def test_cached_pruned_builds_once_and_keys_on_what_the_ranking_reads(tmp_path):
    from flexkd.pruning import cached_pruned

    source = tmp_path / "teacher"
    llama().save_pretrained(source)
    plan = PrunePlan(hidden_size=32, num_heads=2, intermediate_size=48)
    folder, info = cached_pruned(source, plan, tmp_path / "cache", batches())
    assert not info.cache_hit and info.info["shape"]["hidden_size"] == 32
    again, info2 = cached_pruned(source, plan, tmp_path / "cache", batches())
    assert again == folder and info2.cache_hit
    other, info3 = cached_pruned(source, plan, tmp_path / "cache", batches(seed=5))
    assert other != folder and not info3.cache_hit
    batch = batches(1, seed=7)[0]
    direct = build_pruned(source, plan, batches())
    reloaded = AutoModelForCausalLM.from_pretrained(folder).eval()
    assert torch.equal(outputs(reloaded, batch), outputs(direct, batch))


def test_a_prune_spec_builds_a_pruned_student_and_validates_from_config_only(tmp_path):
    from flexkd.model_info import ModelInfo
    from flexkd.models import build_model
    from flexkd.pruning import evenly_spaced_layers
    from flexkd.validation import check_model_spec

    def model_info(role, spec, resolve):
        return ModelInfo.from_spec(role, spec, lambda key, s: resolve(s), "causal_lm")

    assert evenly_spaced_layers(30, 6) == [0, 6, 12, 17, 23, 29]
    assert evenly_spaced_layers(3, 2) == [0, 2]
    source = tmp_path / "teacher"
    llama().save_pretrained(source)
    spec = {"name": "student", "prune": {"from": str(source), "hidden_size": 32, "num_layers": 2,
                                         "rank_by": "random"}}
    check_model_spec("pair.student", spec)
    info = model_info("student", spec, lambda s: s)
    assert (info.width, info.depth, info.vocab) == (32, 2, VOCAB)
    student = build_model(spec, "instruction", None, cache_dir=tmp_path / "cache")
    assert (student.hidden_size, student.num_layers, student.num_outputs) == (32, 2, VOCAB)
    record = json.loads(next((tmp_path / "cache" / "pruned").glob(f"*/{RECORD_FILE}")).read_text())
    assert student.backbone.flexkd_pruning["kept"] == record["kept"]
    assert record["kept"]["layers"] == [0, 2] and record["plan"]["keep_layers"] == [0, 2]
    with pytest.raises(ConfigError, match="^pair.student.prune.hidden_size=99"):
        model_info("student", {"name": "s", "prune": {"from": str(source), "hidden_size": 99}},
                   lambda s: s)
    with pytest.raises(ConfigError, match="drop pair.student.path"):
        check_model_spec("pair.student", {**spec, "path": str(source)})


def test_a_run_prunes_by_the_teachers_probe_and_flexkd_reuses_it(run_cli, tmp_path):
    """pipeline: teacher -> probe (for pruning) -> pruned student -> flexkd, whose own probe is
    the same cache entry; results.json records the pruning and the before-training metric."""
    from flexkd.models import load_tokenizer
    from flexkd.sources import resolve_source

    tok = load_tokenizer({"tokenizer": "fixture:tiny_tokenizer"}, lambda s: resolve_source(s, tmp_path))
    torch.manual_seed(0)
    cfg = LlamaConfig(hidden_size=64, num_attention_heads=4, num_key_value_heads=2, num_hidden_layers=3,
                      intermediate_size=96, vocab_size=len(tok), max_position_embeddings=128,
                      tie_word_embeddings=True)
    teacher_dir = tmp_path / "teacher"
    LlamaForCausalLM(cfg).save_pretrained(teacher_dir)
    tok.save_pretrained(teacher_dir)
    run = run_cli("pair=tiny_causal", "task=tiny_instruct", "strategy=flexkd", "eval.lm_eval=false",
                  "task.main_metric=perplexity",
                  f"pair.teacher.path={teacher_dir}", "pair.teacher.init=null", "pair.teacher.tokenizer=null",
                  "pair.student.init=null", "pair.student.tokenizer=null",
                  f"+pair.student.prune={{from:'{teacher_dir}',hidden_size:16,num_layers:2}}")
    results = run.results()
    init = results["student_init"]
    pruning = init["pruning"]
    assert pruning["plan"]["rank_by"] == "probe" and pruning["plan"]["probe_layer"] == -1
    assert pruning["cache_hit"] is False and pruning["kept"]["layers"] == [0, 2]
    assert pruning["parameters"]["before"] > pruning["parameters"]["after"] == init["parameters"]
    assert math.isfinite(init["validation"]["perplexity"]) and init["validation"]["perplexity"] > 1
    assert results["width_ratio"] == 4.0
    (probe,) = results["probe"]["probes"]
    assert probe["cache_hit"] is True  # computed once, by the pruning stage
    assert sorted(probe["selected"]) == pruning["kept"]["hidden"]  # the top-16 dims of the probe
