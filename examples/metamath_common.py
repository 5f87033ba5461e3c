"""MetaMathQA -> GSM8K plumbing shared by `loraga_llama_metamath.py` and `lorapro_llama_metamath.py` (the
papers' math-reasoning experiment on Llama-2-7B): prompt format, tokenization with the prompt masked out of the
loss, greedy generation and answer extraction for GSM8K, model loading (bf16 or 4-bit NF4), and offline stand-ins
for `--smoke` (a character-level tokenizer built in code, a tiny random Llama, a few arithmetic records in
MetaMathQA's format). `datasets` is imported lazily, in the real loaders only.
"""

from __future__ import annotations

import re
import string
import tempfile

import torch

PROMPT = ("Below is an instruction that describes a task. Write a response that appropriately completes the "
          "request.\n\n### Instruction:\n{query}\n\n### Response:\n")
ANSWER = re.compile(r"The answer is:?\s*(-?[\d,]*\.?\d+)")
NUMBER = re.compile(r"-?[\d,]*\.?\d+")


def add_args(p) -> None:
    p.add_argument("--model", default="meta-llama/Llama-2-7b-hf")
    p.add_argument("--train-size", type=int, default=100_000, help="MetaMathQA examples (paper: a 100k subset)")
    p.add_argument("--eval-size", type=int, default=None, help="GSM8K test questions (default: all 1,319)")
    p.add_argument("--max-length", type=int, default=1024)
    p.add_argument("--max-new-tokens", type=int, default=512)
    p.add_argument("--quant", choices=["none", "4bit"], default="none", help="4-bit NF4 base (QLoRA-style)")


def extract_answer(text: str) -> str | None:
    """The number after "The answer is:" (MetaMath's format), else the last number in the text; commas dropped."""
    match = ANSWER.search(text)
    numbers = [match.group(1)] if match else NUMBER.findall(text)
    return numbers[-1].replace(",", "").rstrip(".") if numbers else None


def same_number(a: str | None, b: str | None) -> bool:
    try:
        return a is not None and b is not None and abs(float(a) - float(b)) < 1e-6
    except ValueError:
        return False


def encode_example(tokenizer, query: str, response: str, max_length: int) -> dict[str, list[int]]:
    """Token ids of prompt + response + EOS; labels are -100 over the prompt (only the response is learned)."""
    prompt = tokenizer(PROMPT.format(query=query), add_special_tokens=True)["input_ids"]
    answer = tokenizer(response, add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
    ids = (prompt + answer)[:max_length]
    labels = ([-100] * len(prompt) + answer)[:max_length]
    return {"input_ids": ids, "labels": labels}


def collate(examples: list[dict], pad_id: int) -> dict[str, torch.Tensor]:
    """Right-pad a list of encoded examples into a batch."""
    width = max(len(e["input_ids"]) for e in examples)
    ids = torch.full((len(examples), width), pad_id)
    labels = torch.full((len(examples), width), -100)
    mask = torch.zeros((len(examples), width), dtype=torch.long)
    for i, e in enumerate(examples):
        n = len(e["input_ids"])
        ids[i, :n], labels[i, :n], mask[i, :n] = torch.tensor(e["input_ids"]), torch.tensor(e["labels"]), 1
    return {"input_ids": ids, "attention_mask": mask, "labels": labels}


def batch_fn(encoded: list[dict], batch_size: int, pad_id: int, seed: int):
    """An epoch function yielding shuffled padded batches (for `repro_common.cycle`)."""
    gen = torch.Generator().manual_seed(seed)

    def epoch():
        perm = torch.randperm(len(encoded), generator=gen).tolist()
        for i in range(0, len(perm) - batch_size + 1, batch_size):
            yield collate([encoded[j] for j in perm[i:i + batch_size]], pad_id)

    return epoch


@torch.no_grad()
def gsm8k_accuracy(model, tokenizer, questions: list[str], answers: list[str], max_new_tokens: int,
                   batch_size: int = 16) -> float:
    """Greedy generation from the training prompt; correct when the extracted number equals the reference."""
    model.eval()
    tokenizer.padding_side = "left"
    device = next(model.parameters()).device
    correct = 0
    for i in range(0, len(questions), batch_size):
        prompts = [PROMPT.format(query=q) for q in questions[i:i + batch_size]]
        enc = tokenizer(prompts, return_tensors="pt", padding=True).to(device)
        out = model.generate(**enc, max_new_tokens=max_new_tokens, do_sample=False,
                             pad_token_id=tokenizer.pad_token_id)
        texts = tokenizer.batch_decode(out[:, enc["input_ids"].shape[1]:], skip_special_tokens=True)
        correct += sum(same_number(extract_answer(t), a) for t, a in zip(texts, answers[i:i + batch_size]))
    model.train()
    return correct / max(1, len(questions))


def load_real(args):
    """(tokenizer, train records, GSM8K questions, GSM8K answers) from the Hub (needs `datasets`, network)."""
    from datasets import load_dataset  # lazy: only the real run needs it
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(args.model)
    tok.pad_token = tok.pad_token or tok.unk_token or tok.eos_token
    train = load_dataset("meta-math/MetaMathQA", split="train").shuffle(seed=args.seed)
    train = train.select(range(min(args.train_size, len(train))))
    test = load_dataset("gsm8k", "main", split="test")
    if args.eval_size:
        test = test.select(range(min(args.eval_size, len(test))))
    answers = [a.split("####")[-1].strip().replace(",", "") for a in test["answer"]]
    return tok, list(zip(train["query"], train["response"])), list(test["question"]), answers


def char_tokenizer():
    """A character-level `PreTrainedTokenizerFast` built in code (offline): printable ASCII + <pad>, <s>, </s>."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {t: i for i, t in enumerate(["<pad>", "<s>", "</s>", "<unk>", *string.printable])}
    core = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    core.pre_tokenizer = pre_tokenizers.Split("", behavior="isolated")
    return PreTrainedTokenizerFast(tokenizer_object=core, pad_token="<pad>", bos_token="<s>", eos_token="</s>",
                                   unk_token="<unk>")


def load_smoke(args):
    """Offline stand-ins: char tokenizer, 32 arithmetic records in MetaMathQA's format, 4 GSM8K-like questions."""
    gen = torch.Generator().manual_seed(args.seed)
    pairs = torch.randint(1, 20, (36, 2), generator=gen).tolist()
    records = [(f"What is {a}+{b}?", f"{a}+{b}={a + b}. The answer is: {a + b}") for a, b in pairs[:32]]
    questions = [f"What is {a}+{b}?" for a, b in pairs[32:]]
    return char_tokenizer(), records, questions, [str(a + b) for a, b in pairs[32:]]


def smoke_model_dir(vocab_size: int, seed: int) -> str:
    """Save a tiny random Llama (hidden 64, 2 blocks) to a temporary folder, so the smoke run loads it with
    `from_pretrained` exactly like the real model (bf16 or 4-bit)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    # hidden 64: bitsandbytes' CPU inference path for 4-bit weights needs in_features >= its block size (64)
    config = LlamaConfig(vocab_size=vocab_size, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                         num_attention_heads=2, num_key_value_heads=2, max_position_embeddings=256,
                         bos_token_id=1, eos_token_id=2, pad_token_id=0)
    torch.manual_seed(seed)
    folder = tempfile.mkdtemp(prefix="tiny_llama_")
    LlamaForCausalLM(config).save_pretrained(folder)
    return folder


def load_model(path: str, quant: str, dtype: torch.dtype, device: torch.device):
    """The causal LM in `dtype`, or 4-bit NF4 with double quantization and `dtype` compute (QLoRA's recipe)."""
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    if quant == "4bit":
        bnb = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                                 bnb_4bit_compute_dtype=dtype)
        return AutoModelForCausalLM.from_pretrained(path, quantization_config=bnb, dtype=dtype,
                                                    device_map={"": device.index or 0} if device.type == "cuda"
                                                    else "cpu")
    return AutoModelForCausalLM.from_pretrained(path, dtype=dtype).to(device)


def prepare(args, device: torch.device, dtype: torch.dtype):
    """(tokenizer, model path, train batch function, GSM8K questions, answers) for the real or smoke run."""
    tok, records, questions, answers = (load_smoke if args.smoke else load_real)(args)
    path = smoke_model_dir(len(tok), args.seed) if args.smoke else args.model
    encoded = [encode_example(tok, q, r, args.max_length) for q, r in records]
    return tok, path, batch_fn(encoded, args.batch_size, tok.pad_token_id, args.seed), questions, answers
