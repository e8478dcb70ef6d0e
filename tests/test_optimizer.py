"""The training optimizer: AdamW with PyTorch's fused kernel (flexkd.module.adamw)."""

import lightning as L
import pytest
import torch

from flexkd.module import DistillationModule, adamw, fused_allowed, unscaled_mixed_precision
from flexkd.strategies.base import Strategy


def cpu_trainer(precision: str, clip: float | None, **kwargs) -> L.Trainer:
    return L.Trainer(accelerator="cpu", devices=1, precision=precision, gradient_clip_val=clip,
                     logger=False, enable_checkpointing=False, enable_progress_bar=False, **kwargs)


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
    ("bf16-mixed", 1.0, True),  # no scaler: DistillationModule clips it itself
])
def test_the_fused_kernel_wherever_its_gradients_can_be_clipped(precision, clip, fused):
    assert fused_allowed(cpu_trainer(precision, clip)) is fused


def test_only_fp16_mixed_precision_scales_its_gradients():
    from lightning.pytorch.plugins.precision import MixedPrecision

    assert unscaled_mixed_precision(cpu_trainer("bf16-mixed", 1.0).precision_plugin)
    assert not unscaled_mixed_precision(MixedPrecision("16-mixed", device="cpu"))
    assert not unscaled_mixed_precision(cpu_trainer("32-true", 1.0).precision_plugin)


def test_bf16_mixed_clips_a_fused_optimizers_gradients_to_the_norm():
    weight = torch.nn.Parameter(torch.zeros(2, 2))
    module = DistillationModule(torch.nn.Linear(2, 2), Strategy())
    module.student.weight = weight
    module.student.bias.requires_grad_(False)
    module.trainer = cpu_trainer("bf16-mixed", 1.0)
    optimizer = adamw([weight], lr=0.1, weight_decay=0.0)
    assert optimizer.defaults["fused"] is True
    weight.grad = torch.tensor([[3.0, 0.0], [0.0, 4.0]])  # norm 5
    with pytest.raises(RuntimeError, match="fused"):  # what Lightning's plugin alone does
        L.LightningModule.configure_gradient_clipping(module, optimizer, 1.0, "norm")
    module.configure_gradient_clipping(optimizer, 1.0, "norm")
    torch.testing.assert_close(weight.grad, torch.tensor([[0.6, 0.0], [0.0, 0.8]]), rtol=1e-5, atol=0)


@pytest.mark.parametrize("fused", [True, False])
def test_optim_fused_picks_the_kernel_a_run_steps_with(fused):
    module = DistillationModule(torch.nn.Linear(2, 2), Strategy(), fused=fused)
    module.trainer = cpu_trainer("bf16-mixed", 1.0, max_steps=10)
    optimizer = module.configure_optimizers()["optimizer"]
    assert bool(optimizer.defaults["fused"]) is fused
