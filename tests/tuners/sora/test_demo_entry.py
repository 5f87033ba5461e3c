"""The demo's "sora" entry (examples/bbc_demo/variants.py) on a tiny BERT classifier: its `after_step` applies the
proximal map with the learning rate AdamW just used."""

from __future__ import annotations

import sys
from pathlib import Path

import torch

from peft.tuners.sora import SoraLayer, soft_threshold
from tests.helpers.tiny_models import tiny_bert_classifier, token_ids

EXAMPLES = Path(__file__).resolve().parents[3] / "examples"
if str(EXAMPLES) not in sys.path:
    sys.path.insert(0, str(EXAMPLES))

from bbc_demo.variants import VARIANTS  # noqa: E402


def test_sora_demo_entry_steps_and_thresholds():
    spec = VARIANTS["sora"]
    setup = spec.setup(tiny_bert_classifier(), lr=1e-2, ctx={"steps": 3, "batch_size": 2, "max_length": 8})
    model, optimizer = setup.model, setup.optimizer
    layers = [m for m in model.modules() if isinstance(m, SoraLayer)]
    assert len(layers) == 2 * 6 + 1  # query, key, value, three dense layers per block; the pooler's dense
    ids = token_ids()
    for step in range(3):
        out = model(input_ids=ids, attention_mask=torch.ones_like(ids), labels=torch.tensor([0, 2]))
        out.loss.backward()
        optimizer.step()
        smooth = [layer.sora_gate["default"].detach().clone() for layer in layers]
        setup.after_step(step)
        lr = optimizer.param_groups[0]["lr"]
        for layer, g in zip(layers, smooth):
            torch.testing.assert_close(layer.sora_gate["default"].detach(), soft_threshold(g, lr * 1.0),
                                       rtol=0, atol=0)
        optimizer.zero_grad()
