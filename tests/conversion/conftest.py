"""Tiny HF models of every family and their converted checkpoints, built once per session."""

from pathlib import Path

import pytest

from tests.conversion.tiny_models import (
    CASES,
    DERIVED,
    save_derived,
    save_tiny_model,
    save_tokenizer,
)

TOKENIZER_SIZE = 240  # smaller than llama3's 251 embedding rows: the rows decide the padding


@pytest.fixture(scope="session")
def hf_models(tmp_path_factory) -> dict[str, Path]:
    """case -> HF model directory (fp32, sharded safetensors); llama3 has a tokenizer."""
    root = tmp_path_factory.mktemp("hf")
    models = {case: save_tiny_model(case, root / case) for case in CASES}
    save_tokenizer(models["llama3"], TOKENIZER_SIZE)
    return models


@pytest.fixture(scope="session")
def converted(hf_models, tmp_path_factory) -> dict[str, Path]:
    """case -> torch_dist checkpoint converted at TP=1."""
    from megatron_patch.conversion import convert_hf_to_mcore

    root = tmp_path_factory.mktemp("mcore")
    return {case: convert_hf_to_mcore(path, root / case, progress=False)
            for case, path in hf_models.items()}


@pytest.fixture(scope="session")
def derived(tmp_path_factory) -> dict[str, tuple[Path, Path, Path]]:
    """Remote-code case -> (reference HF dir, its checkpoint dir, torch_dist conversion)."""
    from megatron_patch.conversion import convert_hf_to_mcore

    root = tmp_path_factory.mktemp("derived")
    out = {}
    for name in DERIVED:
        reference, model = save_derived(name, root)
        out[name] = reference, model, convert_hf_to_mcore(model, root / f"{name}-mcore",
                                                          progress=False)
    return out
