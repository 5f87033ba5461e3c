"""LoRA-GA's helpers under the seed's import path (Wang, Yu, Li 2024, arXiv 2407.05000). The code lives in
`peft.tuners.loraga` (estimation in `estimate.py`); this module only re-exports it:

    named_grad = estimate_gradient(model=model, dataloader=dataloader, accelerator=accelerator, quant_flag=False)
    with LoraGAContext(model=model, named_grad=named_grad):
        model = get_peft_model(model=model, peft_config=LoraGAConfig(...), adapter_name="default")
    save_loraga_model_init(model, save_dir=save_dir)
    ... train ...
    save_loraga_model_final(model, save_dir=save_dir)   # a plain rank-2r LoRA for the ORIGINAL base weights

With transformers' Trainer (or TRL's): `Trainer(model=get_peft_model(model, LoraGAConfig(...)), ...,
callbacks=[LoraGACallback()])` estimates and initialises at the start of training (docs/loraga.md).
"""

from ..tuners.loraga.estimate import (  # noqa: F401 (re-exports)
    INIT_SUBFOLDER,
    LoraGAContext,
    LowRankGradient,
    OwnedGradients,
    __all__,  # noqa: F401
    _Accumulator,
    capture_gradients,
    estimate_gradient,
    estimation_batches,
    estimation_dataloader,
    save_loraga_model_final,
    save_loraga_model_init,
    supported_weight_modules,
)


def __getattr__(name: str):
    """`LoraGACallback` (the Trainer flow) needs transformers: imported on first use."""
    if name == "LoraGACallback":
        from ..tuners.loraga.callback import LoraGACallback

        return LoraGACallback
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
