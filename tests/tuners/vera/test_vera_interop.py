"""VeRA adapters move both ways between this package and upstream PEFT 0.21.2 (real upstream, in a subprocess),
with and without `save_projection`, with equal outputs."""

from __future__ import annotations

import pytest
import torch

from peft import PeftModel, VeraConfig, get_peft_model

from ._nets import NET_SOURCE, TARGETS, build_net, inputs

pytestmark = pytest.mark.upstream

UPSTREAM_SCRIPT = NET_SOURCE + """
import sys, warnings
from pathlib import Path
from peft import PeftModel, VeraConfig, get_peft_model

warnings.simplefilter("ignore")
root = Path(sys.argv[1])
x = torch.load(root / "x.pt")
for sp in ("True", "False"):
    net = build_net()
    net.load_state_dict(torch.load(root / "base.pt"))
    loaded = PeftModel.from_pretrained(net, root / f"ours_{sp}").eval()
    torch.save(loaded(x).detach(), root / f"up_on_ours_{sp}.pt")
    net = build_net()
    net.load_state_dict(torch.load(root / "base.pt"))
    model = get_peft_model(net, VeraConfig(r=4, target_modules=["lin0", "lin1", "lin2"], projection_prng_key=21,
                                           save_projection=(sp == "True"))).eval()
    g = torch.Generator().manual_seed(7)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "vera_lambda_" in name:
                p.copy_(torch.randn(p.shape, generator=g))
    torch.save(model(x).detach(), root / f"up_own_{sp}.pt")
    model.save_pretrained(root / f"up_{sp}")
emit({"ok": True})
"""


@pytest.fixture(scope="module")
def interop(tmp_path_factory):
    from tests.upstream_harness import run_upstream

    root = tmp_path_factory.mktemp("vera_interop")
    x = inputs(torch.float32)
    torch.save(x, root / "x.pt")
    torch.save(build_net().state_dict(), root / "base.pt")
    ours = {}
    for sp in (True, False):
        model = get_peft_model(build_net(), VeraConfig(r=4, target_modules=TARGETS, projection_prng_key=5,
                                                       save_projection=sp))
        g = torch.Generator().manual_seed(1)
        with torch.no_grad():
            for name, p in model.named_parameters():
                if "vera_lambda_" in name:
                    p.copy_(torch.randn(p.shape, generator=g))
        ours[str(sp)] = model(x).detach()
        model.save_pretrained(root / f"ours_{sp}")
    run_upstream(UPSTREAM_SCRIPT, args=[str(root)], timeout=240)
    return root, x, ours


@pytest.mark.parametrize("sp", ["True", "False"])
def test_our_adapter_in_upstream(interop, sp):
    root, x, ours = interop
    theirs = torch.load(root / f"up_on_ours_{sp}.pt", weights_only=True)
    assert (ours[sp] - build_net()(x)).abs().max() > 1e-3
    torch.testing.assert_close(theirs, ours[sp], rtol=0, atol=1e-6)


@pytest.mark.parametrize("sp", ["True", "False"])
def test_upstream_adapter_in_ours(interop, sp):
    root, x, _ = interop
    theirs = torch.load(root / f"up_own_{sp}.pt", weights_only=True)
    assert (theirs - build_net()(x)).abs().max() > 1e-3
    loaded = PeftModel.from_pretrained(build_net(), root / f"up_{sp}")
    assert loaded.peft_config["default"].save_projection is (sp == "True")
    torch.testing.assert_close(loaded(x), theirs, rtol=0, atol=1e-6)
    torch.testing.assert_close(loaded.merge_and_unload()(x), theirs, rtol=0, atol=1e-5)
