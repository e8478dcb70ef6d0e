"""stage=removal (flexkd.removal): the teacher's accuracy with probe-ranked dims removed."""

import json
import math
from pathlib import Path

import pytest
import torch
from hydra import compose, initialize_config_dir
from transformers import BertConfig, BertModel, LlamaConfig, LlamaForCausalLM, MPNetConfig, MPNetModel

from flexkd.errors import ConfigError
from flexkd.models import CausalLM, SequenceClassifier, transformer_blocks
from flexkd.removal import Removal, StateSite, auto_grid, curves, measure, removals, resolve_grid
from flexkd.sources import resolve_source
from flexkd.validation import validate_config

CONF = Path(__file__).resolve().parents[1] / "conf"
SMALL = dict(hidden_size=16, num_hidden_layers=3, num_attention_heads=2, intermediate_size=32,
             vocab_size=40, max_position_embeddings=32)


def bert():
    torch.manual_seed(0)
    return SequenceClassifier(BertModel(BertConfig(**SMALL)), 3).eval()


def mpnet():
    torch.manual_seed(0)
    return SequenceClassifier(MPNetModel(MPNetConfig(**SMALL)), 3).eval()


def llama(state="post"):
    torch.manual_seed(0)
    backbone = LlamaForCausalLM(LlamaConfig(**SMALL, num_key_value_heads=1))
    return CausalLM(backbone).use_final_norm_state(state).eval()


MODELS = {"bert": bert, "mpnet": mpnet, "llama_post": llama, "llama_pre": lambda: llama("pre")}


def batch(n=5, length=7, seed=0):
    gen = torch.Generator().manual_seed(seed)
    ids = torch.randint(5, 40, (n, length), generator=gen)
    mask = torch.ones(n, length, dtype=torch.long)
    for i, keep in enumerate(torch.randint(2, length + 1, (n,), generator=gen)):
        mask[i, keep:] = 0
    return {"input_ids": ids, "attention_mask": mask}


@pytest.mark.parametrize("name", sorted(MODELS))
def test_site_state_is_the_hidden_state_at_every_layer(name):
    model, inputs = MODELS[name](), batch()
    with torch.no_grad():
        for layer in range(model.num_layers + 1):
            _, state = StateSite(model, layer).capture(inputs)
            want = model(inputs, layers=(layer,)).hidden[layer]
            torch.testing.assert_close(state, want, rtol=0, atol=0)


@pytest.mark.parametrize("name", sorted(MODELS))
def test_cached_replay_equals_full_forward_with_a_masking_hook(name):
    model, inputs = MODELS[name](), batch()
    d = model.hidden_size
    fill = torch.linspace(-1, 1, d)
    basis = torch.linalg.qr(torch.randn(d, 3, generator=torch.Generator().manual_seed(1)))[0]
    edits = [Removal("top", 4, dims=torch.tensor([3, 0, 9, 15])), Removal("dir", 3, basis=basis)]
    with torch.no_grad():
        for layer in range(model.num_layers + 1):
            site = StateSite(model, layer)
            plain, h = site.capture(inputs)
            for edit in edits:
                with site.hooked(lambda s, e=edit: e.apply(s, fill)):
                    full = model(inputs).logits
                # The replay must not run the blocks below the site: spy on block 0's attention.
                calls = []
                first = next(iter(transformer_blocks(model.backbone)[0].children()))
                spy = first.register_forward_hook(lambda *a, c=calls: c.append(1))
                try:
                    replayed = site.replay(inputs, edit.apply(h, fill)).logits
                finally:
                    spy.remove()
                torch.testing.assert_close(replayed, full, rtol=0, atol=1e-6)
                assert not torch.allclose(full, plain.logits)  # the edit changed something
                assert len(calls) == (1 if layer == 0 else 0)
            # Replay of the untouched state is the plain forward; the blocks work normally after.
            torch.testing.assert_close(site.replay(inputs, h).logits, plain.logits, rtol=0, atol=1e-6)
            torch.testing.assert_close(model(inputs).logits, plain.logits, rtol=0, atol=0)


def test_top_m_removal_zeroes_exactly_the_top_m_coordinates():
    model, inputs = bert(), batch()
    scores = torch.tensor([5., 1, 9, 0, 7, 3, 8, 2, 6, 4, 0.5, 1.5, 2.5, 3.5, 4.5, 5.5])
    order = torch.sort(scores, descending=True, stable=True).indices
    plan = removals(order, [0, 3], draws=2, seed=0)
    by_kind = {(r.kind, r.m): r for r in plan if r.draw is None}
    site = StateSite(model, 2)
    seen = {}
    above = transformer_blocks(model.backbone)[2]  # the block that reads layer 2
    hook = above.register_forward_pre_hook(lambda m, args: seen.__setitem__("h", args[0].clone()))
    try:
        with torch.no_grad():
            _, h = site.capture(inputs)
            for kind, dims in (("top", [2, 6, 4]), ("bottom", [10, 1, 3])):
                site.replay(inputs, by_kind[(kind, 3)].apply(h, torch.zeros(16)))
                got = seen["h"]
                assert (got[..., dims] == 0).all()
                keep = [i for i in range(16) if i not in dims]
                torch.testing.assert_close(got[..., keep], h[..., keep], rtol=0, atol=0)
    finally:
        hook.remove()
    randoms = [r for r in plan if r.kind == "random"]
    assert [len(r.dims) for r in randoms] == [3, 3] and randoms[0].dims.tolist() != randoms[1].dims.tolist()


def test_directions_removal_projects_out_the_subspace_by_hand():
    h = torch.tensor([[1.0, 2.0, 3.0]])
    u = torch.tensor([[1.0], [1.0], [0.0]]) / math.sqrt(2)
    # h - (h.u) u = [1,2,3] - (3/sqrt2)(1/sqrt2)[1,1,0] = [-0.5, 0.5, 3]
    got = Removal("top", 1, basis=u).apply(h, torch.zeros(3))
    torch.testing.assert_close(got, torch.tensor([[-0.5, 0.5, 3.0]]))
    # mean fill f = [1,0,0]: h - ((h-f).u) u = [1,2,3] - [1,1,0] = [0, 1, 3]
    got = Removal("top", 1, basis=u).apply(h, torch.tensor([1.0, 0.0, 0.0]))
    torch.testing.assert_close(got, torch.tensor([[0.0, 1.0, 3.0]]))
    # Coordinates are the special case U = e_i: both give the same state.
    e = torch.eye(3)[:, [0, 2]]
    torch.testing.assert_close(Removal("top", 2, basis=e).apply(h, torch.zeros(3)),
                               Removal("top", 2, dims=torch.tensor([0, 2])).apply(h, torch.zeros(3)))


def test_measure_m0_is_the_unablated_accuracy_and_curves_have_every_m():
    model = bert()
    loader = [{"teacher": {**batch(seed=s), "labels": torch.arange(5) % 3}} for s in range(3)]
    order = torch.arange(16)
    plan = removals(order, [0, 2, 8], draws=3, seed=0)
    site = StateSite(model, 3)
    scored = measure(site, loader, plan, torch.zeros(16), torch.device("cpu"))

    def accuracy(pred, gold):
        return float((pred == gold).float().mean())

    result = curves(plan, scored, [0, 2, 8], accuracy)
    with torch.no_grad():
        preds = torch.cat([model(b["teacher"]).logits.argmax(-1) for b in loader])
    plain = float((preds == torch.cat([b["teacher"]["labels"] for b in loader])).float().mean())
    assert result["baseline"] == plain
    assert result["top"][0] == result["bottom"][0] == plain and result["random"][0] == [plain] * 3
    assert result["m"] == [0, 2, 8] and len(result["random"][2]) == 3
    assert result["random_mean"][2] == pytest.approx(sum(result["random"][2]) / 3)


def test_auto_grid_and_grid_bounds():
    assert auto_grid(768) == [0, 12, 24, 48, 96, 192, 384]
    assert auto_grid(128) == [0, 2, 4, 8, 16, 32, 64]
    assert resolve_grid([4, 0, 4], 16) == [0, 4]
    with pytest.raises(ConfigError, match=r"removal.grid=\[0, 17\]: 17 is not in 0..d_T=16"):
        resolve_grid([0, 17], 16)


def compose_job(*overrides):
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        return compose("config", overrides=list(overrides))


@pytest.mark.parametrize("override, message", [
    ("removal.grid=[0,4,500]", "removal.grid=[0, 4, 500]: 500 exceeds the teacher width d_T=128"),
    ("removal.grid=[0,-4]", "removal.grid[1]=-4 is out of range: it must be >= 0"),
    ("removal.random_draws=0", "removal.random_draws"),
    ("removal.fill=median", "removal.fill"),
    ("strategy=projection", "stage=removal ranks dims with the Flex-KD probe"),
    ("task=tiny_instruct", "stage=removal measures a classification teacher's accuracy"),
])
def test_bad_removal_settings_give_one_line_errors(override, message, cache_dir):
    pair = "pair=tiny_causal" if "instruct" in override else "pair=tiny_encoder"
    cfg = compose_job("stage=removal", pair, "task=tiny_cls", override)
    with pytest.raises(ConfigError) as info:
        validate_config(cfg, lambda s: resolve_source(s, cache_dir))
    assert message in str(info.value) and "\n" not in str(info.value)


@pytest.mark.slow
def test_removal_stage_end_to_end_with_table_and_plots(run_cli):
    run = run_cli("stage=removal", "pair=tiny_encoder", "task=tiny_cls", "removal.grid=[0,8,32]",
                  "removal.random_draws=2", "strategy.probe_examples=64",
                  "strategy.selection=coordinates,directions", multirun=True)
    results = [json.loads(p.read_text()) for p in sorted(run.out_dir.glob("*/results.json"))]
    assert len(results) == 2
    for r in results:
        rem = r["removal"]
        assert r["stage"] == "removal" and r["main_metric"] == "accuracy"
        assert rem["m"] == [0, 8, 32] and rem["d"] == 128 and rem["layer"] == 3
        assert rem["fill"] == "zero" and rem["score"] == "grad"
        assert len(rem["top"]) == len(rem["bottom"]) == len(rem["random_mean"]) == 3
        assert all(len(v) == 2 for v in rem["random"])
        assert rem["top"][0] == rem["bottom"][0] == rem["baseline"] == r["metrics"]["teacher"]["accuracy"]
        # The baseline reproduces the cached teacher's own test accuracy.
        assert rem["baseline"] == pytest.approx(rem["teacher_test"], abs=1e-6)
        assert {"teacher", "probe", "removal"} <= set(r["timings"])
    assert sorted(r["removal"]["selection"] for r in results) == ["coordinates", "directions"]

    from benchmarks.tables import main as tables

    summary = tables([str(run.out_dir)])
    text = (run.out_dir / "table.md").read_text()
    assert "| m | top-m removed | bottom-m removed | random-m mean ± std |" in text
    assert len(summary["removal"]) == 2
    plots = sorted(p for p in summary["plots"] if ".removal" in p)
    assert len(plots) == 4 and all((run.out_dir / p).stat().st_size > 0 for p in plots)


class StandInData:
    """The slice of a datamodule that the Flex-KD setup reads."""

    shared = True
    tokenizers: dict = {}

    class task:  # noqa: N801  (stands in for a TaskSpec)
        @staticmethod
        def fingerprint():
            return {"task": "unit"}

    def probe_dataloader(self, examples, batch_size):
        side = {**batch(n=6, seed=3), "labels": torch.tensor([0, 1, 2, 0, 1, 2])}
        return [{"student": side, "teacher": side, "index": torch.arange(6)}]


@pytest.mark.parametrize("selection", ["coordinates", "directions"])
def test_probe_is_the_flexkd_strategys_own_cache_entry(selection, tmp_path):
    from flexkd.importance import cached_probe
    from flexkd.removal import probe_config
    from flexkd.strategies import SetupContext, build_strategy
    from flexkd.strategies.base import load_strategy_config

    teacher, data = bert(), StandInData()
    torch.manual_seed(1)
    student = SequenceClassifier(BertModel(BertConfig(**{**SMALL, "hidden_size": 8})), 3).eval()
    knobs = dict(selection=selection, probe_examples=6, probe_batch_size=6)
    strategy = build_strategy(load_strategy_config("flexkd"), **knobs)
    strategy.setup(SetupContext(teacher=teacher, student=student, datamodule=data,
                                cache_dir=str(tmp_path), teacher_fingerprint="t", seed=0))
    cfg = probe_config(build_strategy(load_strategy_config("flexkd"), **knobs), teacher, 8, seed=0)
    probe = cached_probe(teacher, data.probe_dataloader(6, 6), cfg, tmp_path, "t", data.task.fingerprint())
    assert cfg.layer == 3
    if selection == "coordinates":  # the train run's entry itself
        assert probe.cache_hit and probe.key == strategy.probes[0]["key"] and cfg.k == 8
    else:  # bottom-m directions need the full eigenbasis: k = d_T, all 16 columns
        assert cfg.k == 16 and probe.selection.shape == (16, 16)
        torch.testing.assert_close(probe.selection[:, :8].abs(), strategy.selection_0.abs(),
                                   rtol=0, atol=1e-5)


def test_mean_fill_is_the_probe_datas_token_mean():
    from flexkd.removal import probe_mean

    model, data = bert(), StandInData()
    site = StateSite(model, 1)
    loader = data.probe_dataloader(6, 6)
    mean = probe_mean(site, loader, torch.device("cpu"))
    with torch.no_grad():
        inputs = loader[0]["teacher"]
        h = model(inputs, layers=(1,)).hidden[1]
    want = h[inputs["attention_mask"].bool()].mean(0)
    torch.testing.assert_close(mean, want, rtol=1e-5, atol=1e-6)
    edited = Removal("top", 2, dims=torch.tensor([4, 7])).apply(h, mean)
    assert (edited[..., 4] == mean[4]).all() and (edited[..., 7] == mean[7]).all()


@pytest.mark.slow
def test_removal_stage_on_a_label_word_decoder_at_a_middle_layer_with_mean_fill(run_cli):
    run = run_cli("stage=removal", "pair=tiny_causal", "task=tiny_cls", "removal.grid=[0,4,64]",
                  "removal.fill=mean", "removal.random_draws=2", "strategy.probe_examples=32",
                  "strategy.layer_pairs=[[-1,2]]")
    r = run.results()
    rem = r["removal"]
    assert rem["layer"] == 2 and rem["fill"] == "mean" and rem["d"] == 128 and rem["m"] == [0, 4, 64]
    assert rem["top"][0] == rem["baseline"] == pytest.approx(rem["teacher_test"], abs=1e-6)
    assert all(0.0 <= v <= 1.0 for v in rem["top"] + rem["bottom"] + rem["random_mean"])
    assert "fill_mean" in r["timings"]


def test_removal_settings_are_part_of_a_removal_jobs_identity_only():
    from flexkd.jobs import config_fingerprint

    def fingerprint(*overrides):
        return config_fingerprint(compose_job("pair=tiny_encoder", "task=tiny_cls", *overrides))

    assert fingerprint() == fingerprint("removal.fill=mean")
    assert fingerprint("stage=removal") != fingerprint("stage=removal", "removal.fill=mean")
    cfg = compose_job("pair=tiny_encoder", "task=tiny_cls")
    from omegaconf import OmegaConf

    from flexkd.storage import content_hash

    plain = OmegaConf.to_container(cfg, resolve=True)
    for key in ("removal", "cache_dir", "resume", "debug", "output_dir"):
        plain.pop(key, None)
    plain["trainer"].pop("enable_progress_bar", None)
    plain["checkpoint"].pop("keep_last", None)  # neutral too: a job's identity predates it
    assert fingerprint() == content_hash(plain)  # as before the removal group existed
