"""The tiny HF configs shipped in ``cards/configs/``: tiny_models' cases, one per card.

``python -m tests.conversion.card_configs [DIR]`` (re)writes them (default ``cards/configs``);
test_cards.py checks the shipped files equal what this writes.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

from tests.conversion.tiny_models import tiny_config

CONFIGS_DIR = Path(__file__).resolve().parents[2] / "cards" / "configs"
# card name -> tiny_models case. Odd vocabularies become 250 so that every layout trains
# (padded logits rows would take part in Megatron's softmax; tests/conversion covers odd ones).
CARD_CASES = {
    "llama": "llama3", "mistral": "mistral", "qwen2": "qwen2", "qwen3": "qwen3",
    "bloom": "bloom", "falcon": "falcon_gqa", "starcoder": "starcoder_mqa",
    "starcoder2": "starcoder2", "glm": "glm", "glm4": "glm4", "opt": "galactica",
    "mixtral": "mixtral", "qwen2_moe": "qwen2_moe", "qwen3_moe": "qwen3_moe",
    "deepseek_v3": "deepseek_v3", "deepseek_v2": "deepseek_v2_lite",
}
EVEN_VOCAB = 250


def card_config(name: str) -> dict:
    """``config.json`` contents of a card's tiny model (non-default fields only)."""
    from transformers import AutoModelForCausalLM

    config = tiny_config(CARD_CASES[name])
    if config.vocab_size % 2:
        config.vocab_size = EVEN_VOCAB
    diff = config.to_diff_dict()
    diff.pop("transformers_version", None)
    architecture = AutoModelForCausalLM._model_mapping[type(config)].__name__
    return {"architectures": [architecture], **diff}


def write_configs(directory: Path = CONFIGS_DIR) -> list[Path]:
    """Write every card config as ``<name>.json``."""
    directory.mkdir(parents=True, exist_ok=True)
    paths = []
    for name in CARD_CASES:
        path = directory / f"{name}.json"
        path.write_text(json.dumps(card_config(name), indent=2) + "\n")
        paths.append(path)
    return paths


if __name__ == "__main__":
    for written in write_configs(Path(sys.argv[1]) if len(sys.argv) > 1 else CONFIGS_DIR):
        print(written)
