"""`examples/lorapro_trainer.py --smoke`: the Trainer + LoraProAdamW example runs offline and reloads identically."""

from __future__ import annotations

import importlib.util
from pathlib import Path

SCRIPT = Path(__file__).resolve().parents[2] / "examples" / "lorapro_trainer.py"


def test_lorapro_trainer_example_smoke(tmp_path):
    spec = importlib.util.spec_from_file_location("lorapro_trainer_example", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    result = module.main(["--smoke", "--mode", "efficient", "--output-dir", str(tmp_path)])
    assert len(result["losses"]) == 4 and result["reload_matches"]
    assert (tmp_path / "adapter_model.safetensors").exists()
