"""Which upstream tests `make compat` runs: the selection rule, in one place (documented in docs/compat.md).

Each collected test id gets one verdict, checked in this order:

1. `gpu`: files that only run on an accelerator (`GPU_FILES`) or tests with a GPU-only marker.
2. `other-tuner-file:<file>`: files dedicated to another tuner type, or to a mix of tuner types.
3. `lora-variant-file:<file>`: files dedicated to a LoRA sub-variant or LoRA optimizer issue 15 does not ask for.
4. By the config classes named in the id's parameters (`[...-BOFTConfig-config_kwargs3]`): any class upstream
   defines outside `tuners/lora` and the kept tuner folders (`KEPT_TUNERS`) is `other-tuner:<Class>`; a LoRA
   sub-variant config (`VARIANT_CONFIGS`) is `lora-variant:<Class>`.
5. By words in the id (test name, class name, parameter label): a tuner folder name of upstream's `peft/tuners`
   other than the kept ones (`test_ia3_...`, `TestBOFT`) is `other-tuner:<name>`; a variant word (`VARIANT_WORDS`)
   is `lora-variant:<name>` (always checked: `Vanilla MLP 1 LoRA with KaSA-MLP-LoraConfig-...`); tuner names
   only count when step 4 found no config class (so `LoRA + trainable tokens ...-LoraConfig-...` stays).
6. By the parametrized values (`item.callspec.params`, see `classify_params`), for ids the steps above keep: a
   variant config class (`VARIANT_CONFIGS`) as a value, or a variant word (`VARIANT_WORDS`) as a dict key / config
   attribute with a set value (`{"alora_invocation_tokens": [1]}`) or as a whole string value (`"mica"`), is
   `lora-variant:<word> (param)`. Only LoRA sub-variants are found this way, never other tuners.
7. Everything else is `kept`: LoRA, the tuner types this fork implements in upstream's format (`KEPT_TUNERS`:
   LoHa, LoKr, VeRA, AdaLoRA, with their configs `KEPT_CONFIGS` and their dedicated file `test_vera.py`), and
   generic tests.

Network and GPU needs that only show at run time (a hub model id offline, a skip for a missing accelerator) are
classified from the outcome in `compat.report`, not here.
"""

from __future__ import annotations

import dataclasses
import re
from functools import lru_cache
from pathlib import Path

KEPT = "kept"

GPU_FILES = frozenset({"test_common_gpu.py", "test_gpu_examples.py", "test_gptqmodel.py", "test_quantization.py"})
GPU_WORDS = ("single_gpu_tests", "multi_gpu_tests", "multigpu", "_gpu_", "cuda")

OTHER_TUNER_FILES = frozenset({
    "test_adamss_asa.py", "test_adaption_prompt.py", "test_boft.py", "test_cartridge.py", "test_cpt.py",
    "test_deft.py", "test_frod.py", "test_mixed.py", "test_multitask_prompt_tuning.py", "test_osf.py", "test_poly.py",
    "test_pvera.py", "test_randlora.py", "test_shadow.py", "test_shira.py", "test_stablediffusion.py",
    "test_supertuning.py", "test_unilora.py", "test_vblora.py", "test_xlora.py",
})
VARIANT_FILES = frozenset({
    "test_arrow.py", "test_bdlora.py", "test_velora.py", "test_lora_megatron.py", "test_lorafa.py",
    "test_loraplus.py", "test_riemannian_lora.py",
})

# LoRA's own helper configs (kept) vs. its sub-variants' configs (deselected, counted apart).
LORA_CONFIGS = frozenset({"LoraConfig", "LoraRuntimeConfig", "LoftQConfig", "EvaConfig", "CordaConfig", "LoraGAConfig"})
VARIANT_CONFIGS = frozenset({"KasaConfig", "MontecloraConfig", "BdLoraConfig", "VeloraConfig", "ArrowConfig"})
# Words naming a LoRA sub-variant issue 15 does not ask for; matched like tuner names (see `_word_pattern`).
VARIANT_WORDS = ("kasa", "monteclora", "bd_lora", "velora", "alora", "activated_lora", "arrow", "qalora", "megatron",
                 "mica", "lora_fa", "lora_plus")
# Upstream tuner types this fork implements (kept like LoRA): folder names and their config classes.
KEPT_TUNERS = frozenset({"loha", "lokr", "vera", "adalora"})
KEPT_CONFIGS = frozenset({"LoHaConfig", "LoKrConfig", "VeraConfig", "AdaLoraConfig"})
# Folders of upstream's peft/tuners that are not other tuner types for this purpose.
NOT_OTHER_TUNERS = frozenset({"lora", "mixed", "trainable_tokens"}) | KEPT_TUNERS
# Used when the upstream source is not at hand (unit tests); the run reads the folders and config classes themselves.
FALLBACK_TUNERS = (
    "adalora", "adamss", "adaption_prompt", "beft", "boft", "c3a", "cartridge", "cpt", "deft", "delora", "fourierft",
    "frod", "glora", "gralora", "hira", "hra", "ia3", "lily", "ln_tuning", "loha", "lokr", "miss",
    "multitask_prompt_tuning", "oft", "osf", "p_tuning", "peanut", "poly", "prefix_tuning", "prompt_tuning", "psoft",
    "pvera", "randlora", "road", "shadow", "shira", "supertuning", "tinylora", "unilora", "vblora", "vera", "waveft",
    "xlora",
)

_CONFIG_IN_ID = re.compile(r"(?<![A-Za-z0-9])([A-Z][A-Za-z0-9]*Config)(?![A-Za-z0-9])")


def _word_pattern(word: str) -> re.Pattern:
    """`word` case-insensitively, as a whole word of an id: not inside a longer lowercase run (`deft` does not match
    `default`, `miss` not `missing`), but camel-case joins count (`TestMissLoraConversion`, `IA3Config`).
    `_`, `-` and a space inside `word` match any of the three or nothing."""
    body = "".join("[-_ ]?" if ch in "_-" else re.escape(ch) for ch in word)
    return re.compile(rf"(?:(?<![A-Za-z])|(?=[A-Z]))(?i:{body})(?![a-z])")


class Selector:
    """The rule above, with the tuner names and config classes of the upstream version under test."""

    def __init__(self, tuners: tuple[str, ...] = FALLBACK_TUNERS, other_configs: frozenset[str] | None = None):
        names = sorted((t for t in tuners if t not in NOT_OTHER_TUNERS), key=len, reverse=True)  # boft before oft
        self.tuner_patterns = [(name, _word_pattern(name)) for name in names]
        self.variant_patterns = [(word, _word_pattern(word)) for word in VARIANT_WORDS]
        self.other_configs = other_configs  # None: any config class not LoRA's own / a variant's / a model config

    @classmethod
    def from_upstream(cls, src: Path) -> Selector:
        """Read tuner folders and config classes from upstream's `src/peft/tuners`."""
        tuners_dir = src / "peft" / "tuners"
        tuners = tuple(sorted(p.name for p in tuners_dir.iterdir() if p.is_dir() and not p.name.startswith("_")))
        configs = set()
        for path in tuners_dir.glob("*/*.py"):
            if path.parent.name not in NOT_OTHER_TUNERS:
                configs.update(re.findall(r"^class ([A-Za-z0-9]+Config)\b", path.read_text(), flags=re.M))
        configs.add("TrainableTokensConfig")
        return cls(tuners, frozenset(configs))

    def _is_other_config(self, name: str) -> bool:
        if name in LORA_CONFIGS or name in KEPT_CONFIGS or name in VARIANT_CONFIGS:
            return False
        if self.other_configs is not None:
            return name in self.other_configs
        return name not in _MODEL_CONFIGS

    def classify(self, test_id: str) -> str:
        """Verdict for one pytest node id (`tests/test_x.py::Class::test[params]`): `kept` or a reason string."""
        words = test_id.split("::", 1)[-1]
        params = words[words.find("["):] if "[" in words else ""
        configs = _CONFIG_IN_ID.findall(params)
        verdict = self._by_file(test_id) or self._by_config(configs) or self._by_words(self.variant_patterns, words)
        if verdict:
            return verdict
        if any(name in LORA_CONFIGS or name in KEPT_CONFIGS for name in configs):
            return KEPT
        return self._by_words(self.tuner_patterns, words, "other-tuner") or KEPT

    def classify_item(self, test_id: str, params: dict | None = None) -> str:
        """`classify`, then (for a kept id) `classify_params` on the test's parametrized values."""
        verdict = self.classify(test_id)
        if verdict == KEPT and params:
            verdict = self.classify_params(params) or KEPT
        return verdict

    def classify_params(self, params: dict) -> str | None:
        """`lora-variant:<name> (param)` when a parametrized value is a LoRA sub-variant (step 6), else None."""
        for value in params.values():
            name = self._variant_in_value(value, depth=0)
            if name:
                return f"lora-variant:{name} (param)"
        return None

    def _variant_word(self, text: str, whole: bool = False) -> str | None:
        for word, pattern in self.variant_patterns:
            match = pattern.search(text)
            if match and (not whole or match.group(0) == text):
                return word
        return None

    def _variant_in_value(self, value, depth: int) -> str | None:
        """A variant named by `value`: its config class, a dict key / config field that is set, a whole string."""
        if depth > _MAX_PARAM_DEPTH:
            return None
        if isinstance(value, str):
            return self._variant_word(value, whole=True)
        kind = value if isinstance(value, type) else type(value)
        if kind.__name__ in VARIANT_CONFIGS:
            return kind.__name__
        if isinstance(value, dict):
            items = list(value.items())
        elif isinstance(value, (list, tuple, set, frozenset)):
            return next(filter(None, (self._variant_in_value(v, depth + 1) for v in value)), None)
        elif not isinstance(value, type) and kind.__name__.endswith("Config"):
            items = list(_fields(value).items())
        else:
            return None
        for key, item in items:
            word = self._variant_word(key) if isinstance(key, str) and _is_set(item) else None
            if word:
                return word
            found = self._variant_in_value(item, depth + 1)
            if found:
                return found
        return None

    @staticmethod
    def _by_file(test_id: str) -> str | None:
        file = test_id.split("::", 1)[0].rsplit("/", 1)[-1]
        if file in GPU_FILES or any(word in test_id.lower() for word in GPU_WORDS):
            return "gpu"
        if file in OTHER_TUNER_FILES:
            return f"other-tuner-file:{file}"
        if file in VARIANT_FILES:
            return f"lora-variant-file:{file}"
        return None

    def _by_config(self, configs: list[str]) -> str | None:
        other = [name for name in configs if self._is_other_config(name)]
        if other:
            return f"other-tuner:{other[0]}"
        variant = [name for name in configs if name in VARIANT_CONFIGS]
        return f"lora-variant:{variant[0]}" if variant else None

    @staticmethod
    def _by_words(patterns, words: str, family: str = "lora-variant") -> str | None:
        for name, pattern in patterns:
            if pattern.search(words):
                return f"{family}:{name}"
        return None


_MAX_PARAM_DEPTH = 3


def _fields(config) -> dict:
    """A config object's attributes that differ from its dataclass defaults (`megatron_core="megatron.core"` is
    LoraConfig's default, not a variant); {} for objects that refuse (shim placeholders raise on any attribute)."""
    try:
        values = dict(vars(config))
        defaults = {f.name: f.default for f in dataclasses.fields(config) if f.default is not dataclasses.MISSING}
    except Exception:  # noqa: BLE001 - any object may come in as a parameter
        return {}
    return {k: v for k, v in values.items() if k not in defaults or not _same(v, defaults[k])}


def _same(a, b) -> bool:
    try:
        return bool(a == b)
    except Exception:  # noqa: BLE001
        return False


def _is_set(value) -> bool:
    """A field value that turns a feature on: not None / False / empty (`alora_invocation_tokens=None` is off)."""
    if value is None or value is False:
        return False
    try:
        return bool(value) if isinstance(value, (str, list, tuple, dict, set, int, float)) else True
    except Exception:  # noqa: BLE001
        return True


# Model / backend config classes that appear in ids and say nothing about the tuner (fallback mode only).
_MODEL_CONFIGS = frozenset({"PeftConfig", "LlamaConfig", "BartConfig", "MockModelConfig", "TransformerConfig",
                            "BitsAndBytesConfig", "GPTQConfig", "TorchAoConfig", "DummyConfig", "MockConfig"})


@lru_cache
def default_selector(src: str | None = None) -> Selector:
    """The rule for upstream's source at `src` (`.../peft-0.21.2/src`), or with the built-in names without one."""
    return Selector.from_upstream(Path(src)) if src and Path(src).is_dir() else Selector()


def group_of(verdict: str) -> str:
    """`other-tuner:AdaLoraConfig` -> `other-tuner`; the family a verdict is summed under."""
    return verdict.split(":", 1)[0]
