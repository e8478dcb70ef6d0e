"""The training optimizer: AdamW with PyTorch's fused kernel (flexkd.module.adamw)."""

import lightning as L
import pytest
import torch

from flexkd.module import adamw, fused_allowed


def test_fused_adamw_makes_the_reference_update():
    torch.manual_seed(0)
    start = [torch.randn(300, 7), torch.randn(11)]
    grads = [[torch.randn_like(w) for w in start] for _ in range(3)]

    def train(make):
        params = [torch.nn.Parameter(w.clone()) for w in start]
        optimizer = make(params)
        for step in grads:
            for p, g in zip(params, step, strict=True):
                p.grad = g.clone()
            optimizer.step()
        return optimizer, params

    fused, ours = train(lambda p: adamw(p, lr=0.1, weight_decay=0.3))
    _, reference = train(lambda p: torch.optim.AdamW(p, lr=0.1, weight_decay=0.3, foreach=False))
    assert fused.defaults["fused"] is True  # CPU has a fused kernel
    for a, b, w in zip(ours, reference, start, strict=True):
        assert not torch.equal(a, w)  # the parameters moved
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-6)


def test_parameters_without_a_fused_kernel_get_the_plain_one():
    on_meta = torch.nn.Parameter(torch.ones(3, device="meta"))  # no fused kernel for "meta"
    assert not adamw([on_meta], lr=0.1, weight_decay=0.0).defaults["fused"]


@pytest.mark.parametrize("precision,clip,fused", [
    ("32-true", 1.0, True),
    ("bf16-true", 1.0, True),
    ("bf16-mixed", None, True),
    ("bf16-mixed", 1.0, False),  # Lightning would refuse to clip a fused optimizer's gradients
])
def test_the_fused_kernel_only_where_lightning_can_clip_it(precision, clip, fused):
    trainer = L.Trainer(accelerator="cpu", devices=1, precision=precision, gradient_clip_val=clip,
                        logger=False, enable_checkpointing=False, enable_progress_bar=False)
    assert fused_allowed(trainer) is fused
