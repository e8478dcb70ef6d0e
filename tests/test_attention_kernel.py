"""A model spec's `attn_implementation` picks transformers' attention kernel: the model runs it
(not SDPA when eager is asked), computes the same function, and a kernel the architecture or
machine lacks is a clear error that names the key."""

import pytest
import torch
from omegaconf import OmegaConf

from flexkd.errors import ConfigError
from flexkd.models import build_model, load_saved_model, load_tokenizer, save_model
from flexkd.sources import resolve_source

SPEC = OmegaConf.to_container(OmegaConf.load("conf/pair/tiny_causal.yaml").student)
UNAVAILABLE = r"attn_implementation='no_such_kernel' is not available.*Set it to eager or sdpa"


@pytest.fixture(scope="module")
def tok(tmp_path_factory):
    return load_tokenizer(SPEC, lambda s: resolve_source(s, tmp_path_factory.mktemp("cache")))


def build(tok, **extra):
    return build_model({**SPEC, **extra}, "instruction", tok, seed=0).eval()


def count_sdpa_calls(monkeypatch) -> list:
    calls = []
    sdpa = torch.nn.functional.scaled_dot_product_attention

    def counted(*args, **kwargs):
        calls.append(1)
        return sdpa(*args, **kwargs)

    monkeypatch.setattr(torch.nn.functional, "scaled_dot_product_attention", counted)
    return calls


def test_eager_kernel_runs_instead_of_sdpa_and_gives_the_same_logits(tok, monkeypatch):
    default, eager = build(tok), build(tok, attn_implementation="eager")
    assert (default.attention_kernel, eager.attention_kernel) == ("sdpa", "eager")
    ids = torch.randint(5, len(tok), (3, 11))
    mask = torch.ones_like(ids)
    mask[0, 7:] = 0  # padding: the kernels take the mask
    calls = count_sdpa_calls(monkeypatch)
    with torch.no_grad():
        via_sdpa = default.backbone(input_ids=ids, attention_mask=mask).logits
        assert calls, "the default kernel should be SDPA"
        calls.clear()
        via_eager = eager.backbone(input_ids=ids, attention_mask=mask).logits
    assert not calls
    real = mask.bool()
    torch.testing.assert_close(via_eager[real], via_sdpa[real], rtol=1e-5, atol=1e-5)


def test_a_reloaded_model_keeps_the_kernel_it_is_asked_for(tok, tmp_path):
    save_model(build(tok, attn_implementation="eager"), tok, tmp_path / "m")
    # a saved config does not keep the kernel: the loader is told it
    assert load_saved_model(tmp_path / "m")[0].attention_kernel == "sdpa"
    assert load_saved_model(tmp_path / "m", "eager")[0].attention_kernel == "eager"


def test_a_kernel_the_model_cannot_run_names_the_key(tok):
    with pytest.raises(ConfigError, match=UNAVAILABLE):
        build(tok, attn_implementation="no_such_kernel")


def test_a_saved_model_asked_for_a_kernel_it_cannot_run_names_the_key(tok, tmp_path):
    save_model(build(tok), tok, tmp_path / "m")  # `stage=eval` reloads with the pair's kernel
    with pytest.raises(ConfigError, match=UNAVAILABLE):
        load_saved_model(tmp_path / "m", "no_such_kernel")
