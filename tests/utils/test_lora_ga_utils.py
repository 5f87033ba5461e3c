"""estimate_gradient: equals a hand-written computation, honours iters / peft_config, leaves no trace, and the
offload path and 2-process DDP (gloo) give the plain path's gradients; the estimation dataloader helpers."""

import os
import tempfile

import pytest
import torch
import torch.multiprocessing as mp

from peft import LoraGAConfig
from peft.utils.lora_ga_utils import estimate_gradient, estimation_batches, estimation_dataloader
from tests.tuners.loraga.helpers import Mixed, llama, mixed_batches, token_batches


def _manual(model, batches, names):
    """Average over batches of dL/dW computed with autograd.grad on a copy's weights (fp64 for reference)."""
    model = model.double().train()
    params = {n: model.get_submodule(n).weight for n in names}
    total = {n: torch.zeros_like(p) for n, p in params.items()}
    for batch in batches:
        loss = model(**batch).loss if hasattr(model(**batch), "loss") else model(**batch)["loss"]
        grads = torch.autograd.grad(loss, list(params.values()))
        for n, g in zip(params, grads):
            total[n] += g
    return {n: t / len(batches) for n, t in total.items()}


def test_matches_manual_computation_and_restores_state():
    model, batches = llama(), token_batches(3)
    embed = model.model.embed_tokens.weight
    embed.requires_grad_(False)
    embed.grad = torch.ones_like(embed)  # a leftover .grad survives
    hooks_before = len(model.model.layers[0].self_attn.q_proj.weight._post_accumulate_grad_hooks or {})
    model.eval()
    grads = estimate_gradient(model, batches)
    assert not model.training and all(not m.training for m in model.modules())
    assert embed.requires_grad is False and torch.equal(embed.grad, torch.ones_like(embed))
    assert all(p.grad is None for n, p in model.named_parameters() if "embed" not in n)
    assert len(model.model.layers[0].self_attn.q_proj.weight._post_accumulate_grad_hooks or {}) == hooks_before
    names = [n for n, m in model.named_modules() if isinstance(m, (torch.nn.Linear, torch.nn.Embedding))]
    assert sorted(grads) == sorted(names)  # every adaptable weight, no norms, no biases
    assert all(g.dtype == torch.float32 and g.device.type == "cpu" for g in grads.values())
    expected = _manual(llama(), batches, names)
    for name in names:
        torch.testing.assert_close(grads[name].double(), expected[name], rtol=1e-4, atol=1e-6)


def test_iters_and_peft_config_targets():
    model, batches = llama(), token_batches(3)
    config = LoraGAConfig(target_modules=["q_proj"], iters=1)
    grads = estimate_gradient(model, batches, peft_config=config)
    assert sorted(grads) == ["model.layers.0.self_attn.q_proj", "model.layers.1.self_attn.q_proj"]
    one = estimate_gradient(model, batches[:1], peft_config=LoraGAConfig(target_modules=["q_proj"], iters=5))
    for name in grads:
        torch.testing.assert_close(grads[name], one[name])
    two = estimate_gradient(model, batches, iters=2, peft_config=config)  # explicit iters wins
    assert not torch.allclose(two["model.layers.0.self_attn.q_proj"], one["model.layers.0.self_attn.q_proj"])


def test_every_layer_type_and_errors():
    model, batches = Mixed(), mixed_batches()
    grads = estimate_gradient(model, batches)
    assert {k: tuple(v.shape) for k, v in grads.items()} == {
        "emb": (20, 12), "proj": (12, 16), "conv": (6, 4, 3, 3), "head": (5, 24)}
    with pytest.raises(ValueError, match="no batch"):
        estimate_gradient(model, [])
    with pytest.raises(ValueError, match="no scalar loss"):
        estimate_gradient(model, [{"input_ids": batches[0]["input_ids"]}])
    assert all(p.requires_grad for p in model.parameters())  # restored after the failure too
    with pytest.raises(ValueError, match="iters=0"):
        estimate_gradient(model, batches, iters=0)


def test_offload_path_equals_plain_path():
    batches = token_batches(2)
    plain = estimate_gradient(llama(), batches)
    model = llama()
    offload = estimate_gradient(model, batches, quant_flag=True, origin_type="bf16", quant_type="nf4",
                                no_split_module_classes=["LlamaDecoderLayer"])
    assert sorted(offload) == sorted(plain)
    for name in plain:
        torch.testing.assert_close(offload[name], plain[name], rtol=1e-6, atol=1e-7)
    assert "forward" not in vars(model.model.layers[0]) and model.config.use_cache is not False
    with pytest.raises(ValueError, match="origin_type='int3'"):
        estimate_gradient(model, batches, quant_flag=True, origin_type="int3")
    with pytest.raises(ValueError, match="No module of class"):
        estimate_gradient(model, batches, quant_flag=True, no_split_module_classes=["Nope"])


DDP_SPLIT = ((0, 1), (1, 4))  # uneven: rank 0 runs 1 batch, rank 1 runs 3 (the mean must weight by batch count)


def _ddp_worker(rank, world, init_file, out_dir):
    torch.distributed.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    try:
        torch.set_num_threads(1)
        start, stop = DDP_SPLIT[rank]
        batches = token_batches(4)[start:stop]
        grads = estimate_gradient(llama(), batches)
        wrapped = estimate_gradient(torch.nn.parallel.DistributedDataParallel(llama()), batches)
        torch.save({"plain": grads, "ddp_wrapped": wrapped}, os.path.join(out_dir, f"rank{rank}.pt"))
    finally:
        torch.distributed.destroy_process_group()


def test_ddp_two_processes_equal_one_process_on_combined_batches():
    """2 gloo processes on uneven shares of 4 batches == one process on all 4; also for a DDP-wrapped model (whose
    reducer would otherwise expect gradients for every weight)."""
    with tempfile.TemporaryDirectory() as tmp:
        mp.spawn(_ddp_worker, args=(2, os.path.join(tmp, "init"), tmp), nprocs=2, join=True)
        ranks = [torch.load(os.path.join(tmp, f"rank{i}.pt"), weights_only=True) for i in range(2)]
    single = estimate_gradient(llama(), token_batches(4))
    for name, grad in single.items():
        for got in ranks:
            torch.testing.assert_close(got["plain"][name], grad, rtol=1e-5, atol=1e-7)
            torch.testing.assert_close(got["ddp_wrapped"][name], grad, rtol=1e-5, atol=1e-7)


def test_estimation_dataloader_uses_bsz_iters_max_length():
    config = LoraGAConfig(bsz=3, iters=2, max_length=5)
    data = [{"input_ids": list(range(i, i + 4 + i % 4)), "labels": list(range(i, i + 4 + i % 4))} for i in range(10)]
    batches = estimation_batches(data, config)
    assert len(batches) == 2 and all(b["input_ids"].shape[0] == 3 for b in batches)
    assert max(b["input_ids"].shape[1] for b in batches) == 5
    # row 0 has 4 tokens (padded to 5: label -100 there), row 1 has 5 (cut from 5), row 2 has 6 (cut to 5)
    assert batches[0]["labels"][:, 4].tolist() == [-100, 5, 6]
    assert torch.equal(batches[0]["input_ids"][2], torch.arange(2, 7))
    loader = estimation_dataloader(data, config, shuffle=True, seed=1)
    assert len(list(loader)) == 2
    grads = estimate_gradient(llama(), estimation_dataloader(
        [{"input_ids": torch.arange(8) % 64, "labels": torch.arange(8) % 64}] * 4, config))
    assert grads


def _word_tokenizer():
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {"[PAD]": 0, "[UNK]": 1, **{w: i + 2 for i, w in enumerate("abcdefgh")}}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    return PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="[PAD]", unk_token="[UNK]")


def test_estimation_dataloader_tokenizes_text_with_bsz_iters_max_length():
    """Raw text: `iters` batches of `bsz` rows, truncated to `max_length`, labels = ids with -100 on padding."""
    config = LoraGAConfig(bsz=2, iters=3, max_length=4)
    data = [{"text": " ".join("abcdefgh"[: 2 + i % 6])} for i in range(9)]  # 2, 3, 4, 5, 6, 7, 2, ... words
    batches = estimation_batches(data, config, tokenizer=_word_tokenizer())
    assert len(batches) == 3 and all(b["input_ids"].shape[0] == 2 for b in batches)
    assert [b["input_ids"].shape[1] for b in batches] == [3, 4, 4]  # rows of 2+3, 4+5 (cut), 6+7 (cut) words
    assert batches[0]["input_ids"].tolist() == [[2, 3, 0], [2, 3, 4]]
    assert batches[0]["labels"].tolist() == [[2, 3, -100], [2, 3, 4]]


@pytest.mark.parametrize("quant_flag", [False, True])
def test_accumulates_in_fp32_on_a_bf16_model(quant_flag):
    """The mean of 8 bf16 gradients, summed in fp32, equals the fp64 sum of the same bf16 gradients to fp32
    precision; a bf16 running sum would be off by ~1e-3 (checked below, so the comparison can tell them apart).
    The offload path moves each bf16 gradient to the CPU as it is and sums it there in fp32."""
    batches = token_batches(8, seed=3)
    grads = estimate_gradient(llama(torch.bfloat16), batches, quant_flag=quant_flag,
                              no_split_module_classes=["LlamaDecoderLayer"])
    ref = llama(torch.bfloat16).train()
    names = [n for n, m in ref.named_modules() if isinstance(m, (torch.nn.Linear, torch.nn.Embedding))]
    weights = [ref.get_submodule(n).weight for n in names]
    for p in ref.parameters():
        p.requires_grad_(False)
    for w in weights:
        w.requires_grad_(True)
    per_batch = [torch.autograd.grad(ref(**b).loss, weights) for b in batches]  # bf16, as in the estimation
    worst_bf16 = 0.0
    for i, name in enumerate(names):
        expected = sum(g[i].double() for g in per_batch) / len(batches)
        scale = expected.abs().max().item()
        assert grads[name].dtype == torch.float32
        torch.testing.assert_close(grads[name].double(), expected, rtol=0, atol=1e-6 * scale)
        bf16_sum = per_batch[0][i].clone()
        for g in per_batch[1:]:
            bf16_sum += g[i]
        worst_bf16 = max(worst_bf16, ((bf16_sum.double() / len(batches) - expected).abs().max() / scale).item())
    assert worst_bf16 > 1e-4


def _fails_at_second_batch(batches):
    yield batches[0]
    raise RuntimeError("boom in batch 2")


@pytest.mark.parametrize("quant_flag", [False, True])
def test_everything_restored_when_a_batch_fails_mid_way(quant_flag):
    model = llama()
    model.eval()
    model.model.layers[1].mlp.train()  # mixed train/eval flags must come back as they were
    model.model.norm.weight.requires_grad_(False)
    model.lm_head.weight.grad = torch.full_like(model.lm_head.weight, 3.0)
    flags = {n: (p.requires_grad, len(p._post_accumulate_grad_hooks or {})) for n, p in model.named_parameters()}
    modes = {n: m.training for n, m in model.named_modules()}
    with pytest.raises(RuntimeError, match="boom in batch 2"):
        estimate_gradient(model, _fails_at_second_batch(token_batches(2)), quant_flag=quant_flag,
                          no_split_module_classes=["LlamaDecoderLayer"])
    assert {n: (p.requires_grad, len(p._post_accumulate_grad_hooks or {})) for n, p in model.named_parameters()} \
        == flags
    assert {n: m.training for n, m in model.named_modules()} == modes
    assert torch.equal(model.lm_head.weight.grad, torch.full_like(model.lm_head.weight, 3.0))
    assert all(p.grad is None for n, p in model.named_parameters() if n != "lm_head.weight")
    assert all("forward" not in vars(layer) for layer in model.model.layers)  # offload patches removed
    assert model.config.use_cache is not False


def test_shows_progress(capsys):
    estimate_gradient(llama(), token_batches(3))
    err = capsys.readouterr().err
    assert "Estimating gradients (LoRA-GA)" in err and "3/3" in err


@pytest.mark.parametrize(("origin", "quant", "sizes", "order"), [
    ("bf16", "nf4", [1, 1, 1, 1], [0, 1, 2, 3, 3, 2, 1, 0]),  # 16 / 4 bits: 4 chunks
    ("fp16", "int8", [2, 2], [0, 0, 1, 1, 1, 1, 0, 0]),  # 16 / 8 bits: 2 chunks
])
def test_offload_runs_one_chunk_of_blocks_at_a_time(monkeypatch, origin, quant, sizes, order):
    """Blocks split in bits(origin)/bits(quant) contiguous chunks; each block runs (forward, then its recomputation
    in the backward pass, in reverse) with its own chunk the only one resident."""
    from peft.tuners.loraga import offload
    from tests.helpers.tiny_models import tiny_llama

    calls, real = [], offload._Residency.activate

    def spy(self, index):
        real(self, index)
        calls.append((index, self.current, [len(c) for c in self.chunks]))

    monkeypatch.setattr(offload._Residency, "activate", spy)
    estimate_gradient(tiny_llama(num_layers=4), token_batches(1), quant_flag=True, origin_type=origin,
                      quant_type=quant, no_split_module_classes=["LlamaDecoderLayer"])
    assert [c[0] for c in calls] == order and all(c[0] == c[1] for c in calls)
    assert calls[0][2] == sizes
