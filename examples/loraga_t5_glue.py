"""LoRA-GA on T5-base / GLUE (the LoRA-GA paper's natural-language-understanding experiment), against LoRA and
full fine-tuning.

T5 is trained text-to-text: the input is "<task> sentence: ..." and the target the label word ("positive", ...);
accuracy is measured by scoring every label word (teacher-forced loss) and taking the best, so no generation
quirks. LoRA-GA follows the paper's README: `estimate_gradient` on a few training batches, `LoraGAContext` +
`get_peft_model`, `save_loraga_model_init`, train, `save_loraga_model_final` (a plain rank-2r LoRA on the original
weights; this script reloads it on a fresh base and checks the outputs match).

    # GPU, real model and data (needs `pip install datasets` and network access)
    python examples/loraga_t5_glue.py --task sst2 --method loraga
    python examples/loraga_t5_glue.py --task mnli --method lora --lr 1e-4
    # offline, seconds: a tiny random T5 and random data through the same code path
    python examples/loraga_t5_glue.py --smoke --method loraga

Defaults: rank 8, alpha 16, batch 32, one epoch (capped by `--steps`), AdamW with linear warm-up and decay,
LoRA targets q, k, v, o, wi, wo; learning rates LoRA 1e-4, LoRA-GA 1e-4 (rsLoRA scale), full 1e-4 (the settings
used as far as we know; check them against the paper before comparing numbers).
"""

from __future__ import annotations

import sys
import tempfile
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import repro_common as rc  # noqa: E402

TASKS = {  # GLUE config: (input template, label words, validation split)
    "sst2": ("sst2 sentence: {sentence}", ["negative", "positive"], "validation"),
    "cola": ("cola sentence: {sentence}", ["unacceptable", "acceptable"], "validation"),
    "mrpc": ("mrpc sentence1: {sentence1} sentence2: {sentence2}", ["not_equivalent", "equivalent"], "validation"),
    "qnli": ("qnli question: {question} sentence: {sentence}", ["entailment", "not_entailment"], "validation"),
    "mnli": ("mnli hypothesis: {hypothesis} premise: {premise}", ["entailment", "neutral", "contradiction"],
             "validation_matched"),
}
TARGETS = ["q", "k", "v", "o", "wi", "wo"]


def load_real(args) -> tuple:
    """(model, tokenized train batches fn, eval batches, label candidates) from the Hub and `datasets`."""
    from datasets import load_dataset  # lazy: only the real run needs it
    from transformers import AutoTokenizer, T5ForConditionalGeneration

    template, words, val_split = TASKS[args.task]
    tok = AutoTokenizer.from_pretrained(args.model)
    data = load_dataset("glue", args.task)

    def encode(split, limit=None):
        rows = data[split] if limit is None else data[split].select(range(min(limit, len(data[split]))))
        enc = tok([template.format(**r) for r in rows], truncation=True, max_length=args.max_length,
                  padding="max_length", return_tensors="pt")
        return enc["input_ids"], enc["attention_mask"], torch.tensor(rows["label"])

    candidates = [tok(w, return_tensors="pt")["input_ids"][0] for w in words]
    train, evals = encode("train"), encode(val_split, args.eval_limit)
    model = T5ForConditionalGeneration.from_pretrained(args.model)
    return model, train, evals, candidates


def load_smoke(args) -> tuple:
    """A tiny random T5 (vocab 64) and random inputs whose label is a fixed 2-token word per class."""
    from transformers import T5Config, T5ForConditionalGeneration

    config = T5Config(vocab_size=64, d_model=32, d_kv=8, d_ff=64, num_layers=2, num_decoder_layers=1, num_heads=4,
                      decoder_start_token_id=0, pad_token_id=0, eos_token_id=1)
    rc.set_seed(args.seed)
    model = T5ForConditionalGeneration(config)
    gen = torch.Generator().manual_seed(args.seed)
    candidates = [torch.tensor([2 + 2 * c, 3 + 2 * c, 1]) for c in range(2)]

    def split(n):
        ids = torch.randint(10, 64, (n, 16), generator=gen)
        return ids, torch.ones_like(ids), torch.randint(0, 2, (n,), generator=gen)

    return model, split(64), split(16), candidates


def batches_of(split, candidates, batch_size: int, seed: int):
    """Shuffled batches of (input_ids, attention_mask, labels = the label word's tokens, padded with -100)."""
    ids, mask, y = split
    width = max(len(c) for c in candidates)
    words = torch.full((len(candidates), width), -100)
    for i, c in enumerate(candidates):
        words[i, :len(c)] = c
    gen = torch.Generator().manual_seed(seed)

    def epoch():
        perm = torch.randperm(len(y), generator=gen)
        for i in range(0, len(y) - batch_size + 1, batch_size):
            idx = perm[i:i + batch_size]
            yield {"input_ids": ids[idx], "attention_mask": mask[idx], "labels": words[y[idx]]}

    return epoch


@torch.no_grad()
def accuracy(model, split, candidates, batch_size: int = 64) -> float:
    """Pick the label word with the lowest teacher-forced loss for each example."""
    model.eval()
    ids, mask, y = split
    device = next(model.parameters()).device
    correct = 0
    for i in range(0, len(y), batch_size):
        x, m = ids[i:i + batch_size].to(device), mask[i:i + batch_size].to(device)
        scores = []
        for cand in candidates:
            labels = cand.to(device).expand(len(x), -1).contiguous()
            logits = model(input_ids=x, attention_mask=m, labels=labels).logits.float()
            nll = torch.nn.functional.cross_entropy(logits.transpose(1, 2), labels, reduction="none").sum(-1)
            scores.append(nll)
        correct += int((torch.stack(scores, -1).argmin(-1).cpu() == y[i:i + batch_size]).sum())
    model.train()
    return correct / len(y)


def setup(model, args, train_batches, save_dir: str):
    """(model, optimizer) for --method."""
    from peft import LoraConfig, get_peft_model

    lr = args.lr or 1e-4
    if args.method == "full":
        return model, rc.adamw(model, lr)
    if args.method == "lora":
        config = LoraConfig(r=args.rank, lora_alpha=args.alpha, target_modules=TARGETS, task_type="SEQ_2_SEQ_LM")
        model = get_peft_model(model, config)
        return model, rc.adamw(model, lr)
    from peft import LoraGAConfig

    config = LoraGAConfig(r=args.rank, lora_alpha=args.alpha, target_modules=TARGETS, task_type="SEQ_2_SEQ_LM",
                          use_rslora=True, iters=args.ga_iters, bsz=args.batch_size, max_length=args.max_length)
    estimation = [b for _, b in zip(range(args.ga_iters), rc.cycle(train_batches))]
    model = rc.loraga_wrap(model, config, estimation, save_dir=save_dir)
    return model, rc.adamw(model, lr)


def check_final_adapter(model, args, save_dir: str, split, fresh_base) -> float:
    """Save the LoRA-GA final adapter and reload it on the original base; max |logit difference|."""
    from peft import PeftModel
    from peft.utils import lora_ga_utils as ga

    ga.save_loraga_model_final(model, save_dir=save_dir)
    reloaded = PeftModel.from_pretrained(fresh_base, save_dir).to(next(model.parameters()).device)
    ids, mask, _ = split
    x, m = ids[:8].to(reloaded.device), mask[:8].to(reloaded.device)
    labels = torch.zeros(len(x), 2, dtype=torch.long, device=x.device)
    with torch.no_grad():
        model.eval()
        reloaded.eval()
        a = model(input_ids=x, attention_mask=m, labels=labels).logits
        b = reloaded(input_ids=x, attention_mask=m, labels=labels).logits
    return float((a.float() - b.float()).abs().max())


def main(argv: list[str] | None = None) -> dict:
    p = rc.base_parser(__doc__.split("\n\n")[0])
    p.add_argument("--task", choices=sorted(TASKS), default="sst2")
    p.add_argument("--model", default="t5-base")
    p.add_argument("--method", choices=["lora", "loraga", "full"], default="loraga")
    p.add_argument("--max-length", type=int, default=128)
    p.add_argument("--ga-iters", type=int, default=8, help="LoRA-GA: gradient-estimation batches")
    p.add_argument("--eval-limit", type=int, default=None)
    args = p.parse_args(argv)
    device, dtype = rc.device_and_dtype(args.smoke)
    if args.smoke:
        args.batch_size, args.ga_iters, args.steps = 8, 2, args.steps or 3
    rc.set_seed(args.seed)
    model, train, evals, candidates = (load_smoke if args.smoke else load_real)(args)
    model.to(device)
    train_batches = batches_of(train, candidates, args.batch_size, args.seed)
    steps = args.steps or len(train[2]) // (args.batch_size * args.grad_accum)
    save_dir = args.output_dir or tempfile.mkdtemp(prefix=f"loraga_t5_{args.task}_")
    model, optimizer = setup(model, args, train_batches, save_dir)
    print(f"{args.method}: {rc.trainable_parameters(model):,} trainable parameters, {steps} steps")
    losses = rc.train(model, optimizer, rc.cycle(train_batches), steps, args.grad_accum,
                      autocast_dtype=dtype if device.type == "cuda" else None)
    result = {"method": args.method, "task": args.task, "final_loss": losses[-1],
              "accuracy": accuracy(model, evals, candidates)}
    if args.method == "loraga":
        fresh = (load_smoke if args.smoke else load_real)(args)[0]
        result["reload_max_abs_diff"] = check_final_adapter(model, args, save_dir, evals, fresh)
    print(result)
    return result


if __name__ == "__main__":
    main()
