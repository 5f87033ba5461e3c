"""examples/loraga_flow.py --smoke: the whole LoRA-GA flow runs offline and its checks hold."""

import importlib.util
from pathlib import Path

SCRIPT = Path(__file__).resolve().parents[2] / "examples" / "loraga_flow.py"


def test_loraga_flow_smoke(tmp_path):
    spec = importlib.util.spec_from_file_location("loraga_flow", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    result = module.main(["--smoke", "--output-dir", str(tmp_path)])
    assert result["init_relative_error"] < 1e-5
    assert result["reload_max_abs_error"] < 1e-5
    assert result["upstream_spelling_same_init"]
    assert (tmp_path / "adapter_config.json").is_file()
