"""The demo's masked-token task (`--task mlm`): continued pretraining of MiniLM on BBC News articles.

`BertForMaskedLM` from the MiniLM folder: the encoder is pretrained; the checkpoint has no MLM head, so the head
transform (`cls.predictions.transform`: dense + GELU + LayerNorm) and the decoder bias start from `identity_head_`
(or transformers' seeded random init); the decoder weight is tied to the word embeddings. 15% of the real tokens
(not [CLS] / [SEP] / padding) are chosen; of those 80% become [MASK], 10% a uniformly random token, 10% stay
(BERT's recipe), all from a seeded generator. The loss is the cross-entropy on the
chosen positions only, and only their hidden states go through the vocabulary projection (the full 16 x 64 x 30522
logits tensor would cost more than the encoder).

Training masks are drawn afresh for every step from the run's seed (the same for every method at one seed);
held-out masks are drawn once from HELDOUT_MASK_SEED, the same for every method and seed.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

MASK_PROB = 0.15
HELDOUT_MASK_SEED = 4321
HEAD = "cls.predictions.transform"  # trained whole by every method (with the decoder bias)
HEAD_EXCLUDE = [HEAD + ".dense"]
HEAD_INIT = "identity"  # see `identity_head_`  # a `dense` layer, but the adapters' targets are the encoder's


@dataclass
class MaskSpec:
    mask_id: int
    vocab_size: int
    special_ids: tuple[int, ...]


def mask_tokens(input_ids: torch.Tensor, attention_mask: torch.Tensor, spec: MaskSpec, generator: torch.Generator,
                prob: float = MASK_PROB) -> tuple[torch.Tensor, torch.Tensor]:
    """(masked input ids, labels): each real non-special token is chosen with probability `prob`; a chosen token
    becomes [MASK] (80%), a random token (10%) or stays (10%); labels hold the original id at chosen positions and
    -100 elsewhere. Every draw comes from `generator`, so equal generator states give equal masks."""
    if not 0.0 < prob < 1.0:
        raise ValueError(f"Invalid prob={prob}: expected 0 < prob < 1.")
    eligible = attention_mask.bool()
    for sid in spec.special_ids:
        eligible &= input_ids != sid
    u = torch.rand(input_ids.shape, generator=generator)
    kind = torch.rand(input_ids.shape, generator=generator)
    random_ids = torch.randint(spec.vocab_size, input_ids.shape, generator=generator)
    chosen = eligible & (u < prob)
    labels = torch.where(chosen, input_ids, torch.full_like(input_ids, -100))
    masked = torch.where(chosen & (kind < 0.8), torch.full_like(input_ids, spec.mask_id), input_ids)
    masked = torch.where(chosen & (kind >= 0.9), random_ids, masked)
    return masked, labels


def mask_spec(tokenizer) -> MaskSpec:
    return MaskSpec(tokenizer.mask_token_id, len(tokenizer), tuple(sorted(set(tokenizer.all_special_ids))))


def masked_batches(split, batches: list[torch.Tensor], spec: MaskSpec, seed: int) -> list[dict]:
    """One masked batch per index tensor, masks drawn in order from a generator seeded with `seed`."""
    gen = torch.Generator().manual_seed(seed)
    out = []
    for idx in batches:
        ids, labels = mask_tokens(split.input_ids[idx], split.attention_mask[idx], spec, gen)
        out.append({"input_ids": ids, "attention_mask": split.attention_mask[idx], "labels": labels})
    return out


def heldout_batches(split, spec: MaskSpec, batch_size: int = 64, limit: int | None = None) -> list[dict]:
    """The held-out split with fixed masks (HELDOUT_MASK_SEED), in order, batches of `batch_size`."""
    n = len(split) if limit is None else min(limit, len(split))
    order = [torch.arange(s, min(s + batch_size, n)) for s in range(0, n, batch_size)]
    return masked_batches(split, order, spec, HELDOUT_MASK_SEED)


def gathered_mlm_loss(hidden: torch.Tensor, labels: torch.Tensor, head: nn.Module) -> tuple[torch.Tensor,
                                                                                              torch.Tensor]:
    """(mean cross-entropy over the positions with labels != -100, their logits): `head` (hidden -> vocab logits)
    sees only those positions' hidden states."""
    keep = labels != -100
    if not bool(keep.any()):
        raise ValueError("No masked position in the batch; expected at least one label != -100.")
    logits = head(hidden[keep])
    return nn.functional.cross_entropy(logits, labels[keep]), logits


def gathered_model_class():
    """`BertForMaskedLM` whose forward computes the vocabulary logits at the masked positions only."""
    from transformers import BertForMaskedLM
    from transformers.modeling_outputs import MaskedLMOutput

    class GatheredBertForMaskedLM(BertForMaskedLM):
        def forward(self, input_ids=None, attention_mask=None, labels=None, **kwargs):
            hidden = self.bert(input_ids=input_ids, attention_mask=attention_mask, **kwargs).last_hidden_state
            loss, logits = gathered_mlm_loss(hidden, labels, self.cls)
            return MaskedLMOutput(loss=loss, logits=logits)

    return GatheredBertForMaskedLM


def identity_head_(model: nn.Module) -> None:
    """Start the head as `logits = LayerNorm(GELU(h)) @ E^T`: transform dense = identity (bias 0), LayerNorm weight 1
    and bias 0, decoder bias 0. The checkpoint has no MLM head; with a random transform the loss sits at the unigram
    level (~7.6) for the first 60 steps whatever the method, while the encoder's last hidden states already lie near
    their own tokens' (tied) embeddings."""
    transform = model.cls.predictions.transform
    with torch.no_grad():
        transform.dense.weight.copy_(torch.eye(transform.dense.weight.shape[0]))
        transform.dense.bias.zero_()
        transform.LayerNorm.weight.fill_(1.0)
        transform.LayerNorm.bias.zero_()
        model.cls.predictions.bias.zero_()


def load_model(path: str, seed: int, head_init: str = HEAD_INIT) -> nn.Module:
    """MiniLM with the gathered MLM head. head_init "identity": `identity_head_`; "random": transformers' init drawn
    after `torch.manual_seed(seed)`."""
    if head_init not in ("identity", "random"):
        raise ValueError(f"Invalid head_init={head_init!r}: expected 'identity' or 'random'.")
    torch.manual_seed(seed)
    model = gathered_model_class().from_pretrained(path)
    if head_init == "identity":
        identity_head_(model)
    return model.train()


def head_parameters(model: nn.Module) -> list[nn.Parameter]:
    """The head transform's parameters and the decoder bias (not the decoder weight: it is the word embeddings)."""
    out = []
    for name, p in model.named_parameters():
        plain = name.replace("modules_to_save.default.", "").replace("base_model.model.", "")
        if ".predictions.transform." in plain or plain.endswith("cls.predictions.bias"):
            out.append(p)
    if not out:
        raise ValueError("No MLM head parameter found; expected cls.predictions.transform.* and cls.predictions.bias.")
    return out


@torch.no_grad()
def evaluate(model: nn.Module, batches: list[dict]) -> tuple[float, float]:
    """(top-1 accuracy, mean cross-entropy) over all masked tokens of the held-out batches (token-weighted)."""
    model.eval()
    correct, loss_sum, count = 0, 0.0, 0
    for batch in batches:
        out = model(**batch)
        target = batch["labels"][batch["labels"] != -100]
        correct += int((out.logits.argmax(-1) == target).sum())
        loss_sum += float(out.loss) * len(target)
        count += len(target)
    model.train()
    return correct / count, loss_sum / count
