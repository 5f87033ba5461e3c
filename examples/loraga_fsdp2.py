"""LoRA-GA (arXiv 2407.05000) on a model sharded with FSDP2 (`torch.distributed.fsdp.fully_shard`), one process
per device. The order of operations (docs/loraga.md, "Large models: several GPUs"):

1. inject: `get_peft_model(model, LoraGAConfig(...))` with no gradients waiting (LoRA's default init, B = 0, for
   now; the warning says so);
2. shard: `fully_shard` each decoder layer, then the whole model (base weights, A and B become DTensor shards);
3. estimate: `estimate_gradient` on the sharded model, each rank on its own batches: FSDP averages each weight's
   gradient over the ranks and every rank sums only its shard (1/world of the sums);
4. initialise: `model.base_model.initialise_adapter("default", named_grad)`: each target's SVD runs on one rank
   (targets spread by size), A and B are broadcast, every rank writes its shards of A and B and offsets its rows
   of W by `-s B A` (the model's output is unchanged);
5. train; then gather the adapter (only it) onto rank 0 and `save_pretrained`: the final rank-2r plain LoRA for
   the ORIGINAL weights.

    torchrun --nproc_per_node 2 examples/loraga_fsdp2.py --smoke     # CPU, gloo, tiny random Llama: seconds
    python examples/loraga_fsdp2.py --smoke                          # the same; starts its 2 processes itself
    torchrun --nproc_per_node 8 examples/loraga_fsdp2.py --model-path /path/to/llama --texts train.txt \\
        --output-dir out --rank 8 --steps 100                        # GPUs: nccl, bf16, one text per line

`--smoke` also checks the promises: output unchanged at init, and the saved adapter, loaded by one process on the
original base, reproduces the trained sharded model.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import warnings

import torch
import torch.distributed as dist

TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def tiny_llama(seed: int = 0):
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=2, num_key_value_heads=2, max_position_embeddings=64,
                         tie_word_embeddings=False)
    torch.manual_seed(seed)
    return LlamaForCausalLM(config).eval()


def random_batches(n: int, bsz: int, seq: int, seed: int) -> list[dict]:
    """Sequences counting up modulo 64 from a random start (different seeds: different data on each rank)."""
    gen = torch.Generator().manual_seed(seed)
    ids = [(torch.randint(0, 64, (bsz, 1), generator=gen) + torch.arange(seq)) % 64 for _ in range(n)]
    return [{"input_ids": x, "labels": x} for x in ids]


def text_batches(path: str, tokenizer, config, rank: int, world: int) -> list[dict]:
    """This rank's share of the lines of `path` (every world-th line), as `config.iters` batches of `config.bsz`."""
    from peft.utils.lora_ga_utils import estimation_batches

    with open(path, encoding="utf-8") as f:
        texts = [{"text": line.strip()} for line in f if line.strip()][rank::world]
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    return estimation_batches(texts, config, tokenizer=tokenizer)


def shard(model):
    """FSDP2: each decoder layer, then the root (embeddings, norm, head and what is left)."""
    from torch.distributed.fsdp import fully_shard

    for block in model.base_model.model.model.layers:
        fully_shard(block)
    fully_shard(model)
    return model


def adapter_state_on_rank0(model) -> dict:
    """The adapter's parameters in full on rank 0 (each gathered in turn; empty elsewhere): only the adapter, never
    the base weights, travels."""
    model.reshard()
    state = {}
    for name, param in model.named_parameters():
        if "lora_" in name:
            full = param.full_tensor() if hasattr(param, "full_tensor") else param
            if dist.get_rank() == 0:
                state[name] = full.detach().cpu()
    return state


def run(args: argparse.Namespace) -> dict:
    from peft import LoraGAConfig, PeftModel, get_peft_model
    from peft.utils.lora_ga_utils import estimate_gradient

    rank, world = dist.get_rank(), dist.get_world_size()
    gpu = torch.cuda.is_available() and not args.smoke
    config = LoraGAConfig(target_modules=TARGETS, r=args.rank, lora_alpha=2 * args.rank, use_rslora=True,
                          iters=args.ga_iters, bsz=args.batch_size, max_length=args.max_length)
    if args.model_path:
        from transformers import AutoModelForCausalLM, AutoTokenizer

        base = AutoModelForCausalLM.from_pretrained(args.model_path, dtype=torch.bfloat16 if gpu else torch.float32)
        batches = text_batches(args.texts, AutoTokenizer.from_pretrained(args.model_path), config, rank, world)
    else:
        base = tiny_llama()
        batches = random_batches(args.ga_iters + args.steps, args.batch_size, 16, seed=100 + rank)
    probe = random_batches(1, 2, 16, seed=9)[0]["input_ids"]
    with warnings.catch_warnings():  # "No LoraGAContext is open": expected, the init comes in step 4
        warnings.filterwarnings("ignore", message="No LoraGAContext")
        model = get_peft_model(base, config, autocast_adapter_dtype=False)  # 1. inject (A, B in the base's dtype)
    model = shard(model)  # 2. shard (moves the shards to the mesh's device)
    device = torch.device("cuda", torch.cuda.current_device()) if gpu else torch.device("cpu")
    to = lambda batch: {k: v.to(device) for k, v in batch.items()}  # noqa: E731
    with torch.no_grad():
        before = model(input_ids=probe.to(device)).logits.float()
    named_grad = estimate_gradient(model, [to(b) for b in batches[:args.ga_iters]], peft_config=config)  # 3.
    held = sum(g.to_local().numel() * 4 for g in named_grad.values())
    model.base_model.initialise_adapter("default", named_grad)  # 4. distributed SVD, A/B/offset in place
    del named_grad
    with torch.no_grad():
        init_error = (model(input_ids=probe.to(device)).logits.float() - before).abs().max().item()
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=args.lr)  # 5. train
    model.train()
    losses = []
    for step in range(args.steps):
        loss = model(**to(batches[(args.ga_iters + step) % len(batches)])).loss
        loss.backward()
        opt.step()
        opt.zero_grad()
        losses.append(loss.item())
    model.eval()
    with torch.no_grad():
        trained = model(input_ids=probe.to(device)).logits.float().cpu()
    state = adapter_state_on_rank0(model)
    result = {"world": world, "init_max_abs_diff": init_error, "losses": losses, "grad_bytes_rank": held,
              "grad_bytes_total": sum(m.weight.numel() * 4 for _, m in model.base_model.adapter_layers("default"))}
    if rank == 0:
        out = result["output_dir"] = args.output_dir or tempfile.mkdtemp(prefix="loraga_fsdp2_")
        model.save_pretrained(out, state_dict=state)  # the rank-2r LoRA for the original weights
        if args.smoke:  # one process, the original base, the saved adapter == the trained sharded model
            reloaded = PeftModel.from_pretrained(tiny_llama(), out).eval()
            with torch.no_grad():
                result["reload_max_abs_diff"] = (reloaded(input_ids=probe).logits - trained).abs().max().item()
        print(json.dumps({k: v for k, v in result.items() if k != "losses"} | {"final_loss": losses[-1]}))
    return result


def _worker(local_rank: int, world: int, init_file: str, argv: list[str], out: str) -> None:
    """One process of `python examples/loraga_fsdp2.py --smoke` (without torchrun)."""
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=local_rank, world_size=world)
    try:
        torch.set_num_threads(1)
        result = run(parse_args(argv))
        if local_rank == 0:
            torch.save(result, out)
    finally:
        dist.destroy_process_group()


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--smoke", action="store_true", help="tiny random Llama on the CPU (gloo), a few steps")
    p.add_argument("--model-path", default=None, help="a causal LM (transformers); default: tiny random Llama")
    p.add_argument("--texts", default=None, help="with --model-path: a text file, one training example per line")
    p.add_argument("--rank", type=int, default=4)
    p.add_argument("--ga-iters", type=int, default=2, help="estimation batches per process")
    p.add_argument("--batch-size", type=int, default=2)
    p.add_argument("--max-length", type=int, default=512)
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--lr", type=float, default=3e-4)
    p.add_argument("--output-dir", default=None)
    args = p.parse_args(argv)
    if args.smoke:
        args.model_path, args.steps, args.rank = None, 3, 2
    if args.model_path and not args.texts:
        p.error("--model-path needs --texts (one training example per line)")
    return args


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    if "RANK" in os.environ:  # under torchrun
        gpu = torch.cuda.is_available() and not args.smoke
        if gpu:
            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", 0)))
        dist.init_process_group("nccl" if gpu else "gloo")
        try:
            return run(args)
        finally:
            dist.destroy_process_group()
    if not args.smoke:
        raise SystemExit("Run it with torchrun (e.g. torchrun --nproc_per_node 8 examples/loraga_fsdp2.py ...), or "
                         "with --smoke to start 2 CPU processes.")
    import torch.multiprocessing as mp

    with tempfile.TemporaryDirectory() as tmp:
        argv = list(sys.argv[1:] if argv is None else argv)
        out = os.path.join(tmp, "result.pt")
        mp.spawn(_worker, args=(2, os.path.join(tmp, "init"), argv, out), nprocs=2, join=True)
        return torch.load(out, weights_only=False)


if __name__ == "__main__":
    main()
