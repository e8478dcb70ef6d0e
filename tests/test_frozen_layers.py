"""`trainable_layers`: the lower blocks are frozen and, being fixed features, run without
dropout (eval mode) while the trained top blocks and the head keep theirs, also inside a
Lightning fit started on a model in train mode."""

import lightning as L
import pytest
import torch
from transformers import AutoTokenizer

from flexkd.fixtures import fixture_path
from flexkd.models import build_model, transformer_blocks
from flexkd.module import DistillationModule
from flexkd.strategies.base import Strategy

BERT = {"model_type": "bert", "hidden_size": 32, "num_hidden_layers": 3, "num_attention_heads": 2,
        "intermediate_size": 64, "max_position_embeddings": 64, "hidden_dropout_prob": 0.5,
        "attention_probs_dropout_prob": 0.5}


@pytest.fixture
def classifier():
    tok = AutoTokenizer.from_pretrained(str(fixture_path("tiny_tokenizer")))
    torch.manual_seed(0)
    model = build_model({"name": "tiny", "init": BERT}, "classification", tok, ["neg", "pos"])
    ids = torch.randint(5, tok.vocab_size, (4, 12))
    batch = {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": torch.tensor([0, 1, 0, 1])}
    return model, batch


def block_output(model, batch, index: int) -> torch.Tensor:
    captured = {}
    block = transformer_blocks(model.backbone)[index]
    handle = block.register_forward_hook(lambda m, a, out: captured.__setitem__("out", out[0]))
    try:
        logits = model(batch).logits
    finally:
        handle.remove()
    return captured["out"], logits


def test_frozen_blocks_run_without_dropout_and_trained_ones_with_it(classifier):
    model, batch = classifier
    module = DistillationModule(model, Strategy(), trainable_layers=1)
    module.train()
    blocks = transformer_blocks(model.backbone)
    assert [b.training for b in blocks] == [False, False, True]
    assert not model.backbone.embeddings.training and model.head.training
    assert [p.requires_grad for b in blocks for p in b.parameters()][-1]
    # Below the cut the forward is deterministic; at the top, dropout still draws masks.
    below_1, logits_1 = block_output(model, batch, 1)
    below_2, logits_2 = block_output(model, batch, 1)
    assert torch.equal(below_1, below_2)
    assert not torch.equal(logits_1, logits_2)
    model.eval()
    assert torch.equal(block_output(model, batch, 1)[0], below_1)  # = eval mode's features


def test_without_trainable_layers_every_block_keeps_dropout(classifier):
    model, batch = classifier
    DistillationModule(model, Strategy()).train()
    assert all(b.training for b in transformer_blocks(model.backbone))
    assert not torch.equal(block_output(model, batch, 1)[0], block_output(model, batch, 1)[0])


def test_the_modes_hold_inside_a_lightning_fit(classifier):
    model, batch = classifier
    module = DistillationModule(model, Strategy(), trainable_layers=1)
    seen = []

    class Modes(L.Callback):
        def on_train_batch_start(self, trainer, pl_module, *args):
            seen.append([b.training for b in transformer_blocks(model.backbone)])

    loader = torch.utils.data.DataLoader([{"student": batch, "index": torch.arange(4)}] * 3,
                                         batch_size=None)
    trainer = L.Trainer(accelerator="cpu", max_steps=3, logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False, callbacks=[Modes()],
                        num_sanity_val_steps=0)
    model.train()  # as the pipeline does before a fit: Lightning keeps the modes it finds
    trainer.fit(module, train_dataloaders=loader)
    assert seen == [[False, False, True]] * 3
