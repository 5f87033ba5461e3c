"""The whole LoRA-GA flow (Wang, Yu, Li 2024, arXiv 2407.05000) on a tiny random Llama, offline, in seconds:

1. estimate the gradient of the loss w.r.t. every target weight on a few batches (`estimate_gradient`);
2. build the LoRA-GA model inside `LoraGAContext` (A, B from the SVD of the gradient, base offset by `-s B A`,
   so the output is unchanged at init);
3. `save_loraga_model_init`, train a few AdamW steps, `save_loraga_model_final` (a plain rank-2r LoRA for the
   ORIGINAL weights);
4. reload that adapter on a freshly built original base and check it reproduces the trained model.

Also shows upstream PEFT's spelling (`LoraConfig(init_lora_weights="lora_ga")` + `preprocess_loraga`) reaching the
same initialisation.

    python examples/loraga_flow.py --smoke            # tiny sizes, a few steps
    python examples/loraga_flow.py --steps 200        # longer: compare the loss curve with plain LoRA
    python examples/loraga_flow.py --smoke --dtype bf16   # a bf16 base: the init error is bf16's rounding
"""

from __future__ import annotations

import argparse
import tempfile

import torch


def build_model(width: int, seed: int = 0, dtype: torch.dtype = torch.float32):
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(vocab_size=64, hidden_size=width, intermediate_size=2 * width, num_hidden_layers=2,
                         num_attention_heads=2, num_key_value_heads=2, max_position_embeddings=64,
                         tie_word_embeddings=False)
    torch.manual_seed(seed)
    return LlamaForCausalLM(config).to(dtype).eval()


def make_batches(n: int, bsz: int, seq: int, seed: int = 1) -> list[dict]:
    """Sequences that count up modulo 64 from a random start: an easy pattern to learn."""
    gen = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(n):
        start = torch.randint(0, 64, (bsz, 1), generator=gen)
        ids = (start + torch.arange(seq)) % 64
        out.append({"input_ids": ids, "labels": ids})
    return out


def train(model, batches, steps: int, lr: float) -> list[float]:
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=lr)
    model.train()
    losses = []
    for step in range(steps):
        loss = model(**batches[step % len(batches)]).loss
        loss.backward()
        opt.step()
        opt.zero_grad()
        losses.append(loss.item())
    return losses


def run(args: argparse.Namespace) -> dict:
    from peft import LoraConfig, LoraGAConfig, PeftModel, get_peft_model, preprocess_loraga
    from peft.utils.lora_ga_utils import (
        LoraGAContext,
        estimate_gradient,
        save_loraga_model_final,
        save_loraga_model_init,
    )

    save_dir = args.output_dir or tempfile.mkdtemp(prefix="loraga_flow_")
    targets = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
    config = LoraGAConfig(target_modules=targets, r=args.rank, lora_alpha=2 * args.rank, use_rslora=True,
                          iters=args.ga_iters, bsz=args.batch_size)
    batches, probe = make_batches(16, args.batch_size, 16), make_batches(1, 2, 16, seed=9)[0]["input_ids"]

    dtype = {"fp32": torch.float32, "bf16": torch.bfloat16}[args.dtype]
    model = build_model(args.width, dtype=dtype)
    with torch.no_grad():
        base_logits = model(input_ids=probe).logits
    named_grad = estimate_gradient(model=model, dataloader=batches, peft_config=config)  # stops after `iters`
    with LoraGAContext(model=model, named_grad=named_grad):
        model = get_peft_model(model=model, peft_config=config, adapter_name="default")
    del named_grad
    with torch.no_grad():
        init_error = ((model(input_ids=probe).logits - base_logits).norm() / base_logits.norm()).item()
    save_loraga_model_init(model, save_dir=save_dir)
    losses = train(model, batches, args.steps, args.lr)
    model.eval()
    with torch.no_grad():
        trained = model(input_ids=probe).logits
    save_loraga_model_final(model, save_dir=save_dir)
    reloaded = PeftModel.from_pretrained(build_model(args.width, dtype=dtype), save_dir).eval()
    with torch.no_grad():
        reload_error = (reloaded(input_ids=probe).logits - trained).abs().max().item()  # bf16: the offset's rounding

    # Upstream PEFT's spelling: same initialisation, reached through LoraConfig + preprocess_loraga.
    other = build_model(args.width, dtype=dtype)
    up_config = LoraConfig(target_modules=targets, r=args.rank, lora_alpha=2 * args.rank, use_rslora=True,
                           init_lora_weights="lora_ga", lora_ga_config={"direction": "ArB2r", "scale": "stable"})

    def train_step() -> None:
        for batch in batches[: args.ga_iters]:
            other(**batch).loss.backward()

    preprocess_loraga(other, up_config, train_step)
    other = get_peft_model(other, up_config)
    theirs_A = other.base_model.model.model.layers[0].self_attn.q_proj.lora_A["default"].weight
    same_init = torch.allclose(theirs_A.abs(), _init_A(save_dir), atol=1e-5)  # singular vectors: up to sign
    result = {"init_relative_error": init_error, "first_loss": losses[0], "last_loss": losses[-1],
              "reload_max_abs_error": reload_error, "upstream_spelling_same_init": same_init, "save_dir": save_dir}
    for key, value in result.items():
        print(f"{key}: {value}")
    return result


def _init_A(save_dir: str) -> torch.Tensor:
    from safetensors.torch import load_file

    state = load_file(f"{save_dir}/loraga_init/adapter_model.safetensors")
    return state["base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight"].abs()


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--smoke", action="store_true", help="tiny sizes and a few steps (seconds)")
    p.add_argument("--width", type=int, default=64)
    p.add_argument("--rank", type=int, default=4)
    p.add_argument("--steps", type=int, default=100)
    p.add_argument("--lr", type=float, default=3e-3)
    p.add_argument("--batch-size", type=int, default=4)
    p.add_argument("--ga-iters", type=int, default=4)
    p.add_argument("--output-dir", default=None)
    p.add_argument("--dtype", choices=["fp32", "bf16"], default="fp32", help="base weights' dtype (bf16: see the "
                   "init_relative_error the rounding of W - s B A gives)")
    args = p.parse_args(argv)
    if args.smoke:
        args.width, args.rank, args.steps, args.ga_iters = 32, 2, 5, 2
    return run(args)


if __name__ == "__main__":
    main()
