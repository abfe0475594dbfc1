"""Verification cards (``megatron-patch card``, issue 13): shipped configs, --tiny, regressions.

The distributed test regenerates every committed card in ``cards/`` with the settings recorded
in it (one torchrun launch of 2 gloo processes for all families) and fails on a regression:
a check that passed in the committed card fails now, a layout disappeared, or a difference
exceeds the card's tolerance; the failure names the card and field.
"""

import copy
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from megatron_patch.conversion.tiny import config_from_dict, shrink_config
from megatron_patch.conversion.verify.card import Layout, parse_layouts, read_card, regressions
from megatron_patch.models.registry import family_for_hf_config, registered_families
from tests.conversion.card_configs import CARD_CASES, CONFIGS_DIR, card_config
from tests.conversion.tiny_models import tiny_config
from tests.launch import REPO

CARDS = REPO / "cards"
# no card: remote-code families (transformers cannot build them; tests/conversion covers them)
# and the vision-language families (their forward needs images; tests/vlm covers them)
NO_CARD = {"chatglm", "baichuan", "llava", "qwen2_vl"}
# (card, layout) whose training comparison fails in the committed card: DeepSeek's MLA at TP=2
# (sequence parallel) has a lower gradient norm than HF from step 1 and its loss drifts from
# step 3 while its logits match. A real finding of the cards, recorded, not yet fixed.
KNOWN_TRAIN_FAILURES: set[tuple[str, str]] = set()


def _committed() -> dict[str, dict]:
    return {path.stem: read_card(path) for path in sorted(CARDS.glob("*.md"))
            if path.name != "README.md"}


def read_json(path: Path) -> dict:
    return json.loads(path.read_text())


def test_shipped_configs_are_the_tiny_cases():
    shipped = {path.stem for path in CONFIGS_DIR.glob("*.json")}
    assert shipped == set(CARD_CASES), "regenerate: python -m tests.conversion.card_configs"
    for name in CARD_CASES:
        assert read_json(CONFIGS_DIR / f"{name}.json") == card_config(name), \
            f"cards/configs/{name}.json is stale: python -m tests.conversion.card_configs"


def test_every_family_has_a_passing_card_with_its_layouts():
    cards = _committed()
    assert set(cards) == set(CARD_CASES)
    assert {card["family"] for card in cards.values()} == set(registered_families()) - NO_CARD
    for name, card in cards.items():
        assert card["roundtrip"]["bit_identical"], name
        ran = {layout for layout, entry in card["layouts"].items() if "skipped" not in entry}
        assert "tp1pp2" in ran, name  # every family at PP=2
        assert "tp2pp1" in ran, name  # and at TP=2, MQA included
        config = read_json(REPO / card["config"])
        if family_for_hf_config(config).hf_to_megatron(config).get("num_experts"):
            assert "tp1pp1ep2" in ran, name
        for layout, entry in card["layouts"].items():
            assert entry.get("logits_ok", True), (name, layout, entry)
            assert entry.get("train_ok", True) or (name, layout) in KNOWN_TRAIN_FAILURES, \
                (name, layout, entry)


def _default_full_size(name: str) -> dict:
    """The config class defaults of a card's family: the full-size published model."""
    from transformers import AutoModelForCausalLM

    config_class = type(tiny_config(CARD_CASES[name]))
    full = config_class().to_dict()
    full["architectures"] = [AutoModelForCausalLM._model_mapping[config_class].__name__]
    return full


def _structure(megatron_args: dict) -> dict:
    """Everything of a Megatron config that is not a size: flags, types, rope, epsilons."""
    return {k: v for k, v in megatron_args.items()
            if isinstance(v, (bool, str, float)) or v is None or isinstance(v, dict)}


@pytest.mark.parametrize("name", sorted(CARD_CASES))
def test_tiny_keeps_the_structure_of_the_full_size_config(name):
    from transformers import AutoModelForCausalLM

    full = _default_full_size(name)
    tiny = shrink_config(full)
    assert shrink_config(tiny) == tiny
    family = family_for_hf_config(full)
    big, small = family.hf_to_megatron(full), family.hf_to_megatron(tiny)
    assert _structure(small) == _structure(big)
    groups = big.get("num_query_groups") or big["num_attention_heads"]
    ratio = big["num_attention_heads"] // groups
    tiny_groups = small.get("num_query_groups") or small["num_attention_heads"]
    if groups == 1:  # MQA stays MQA
        assert tiny_groups == 1
    else:  # GQA keeps its ratio (at most 8), MHA stays MHA
        assert tiny_groups > 1 and small["num_attention_heads"] // tiny_groups == min(ratio, 8)
    assert small["num_layers"] <= 4 and small["hidden_size"] <= 256
    if big.get("num_experts"):
        assert small["num_experts"] <= 8 and small["moe_router_topk"] >= min(
            big["moe_router_topk"], 2)
    model = AutoModelForCausalLM.from_config(config_from_dict(tiny))
    assert sum(p.numel() for p in model.parameters()) < 2_000_000


def _good_card() -> dict:
    card = _committed()["qwen3_moe"]
    return copy.deepcopy(card)


def test_regressions_name_the_card_and_field():
    baseline = _good_card()
    assert regressions(baseline, copy.deepcopy(baseline)) == []

    new = copy.deepcopy(baseline)
    del new["layouts"]["tp1pp2"]
    new["layouts"]["tp2pp1"]["logits_max_abs_diff"] = 3e-3
    new["layouts"]["tp2pp1"]["logits_ok"] = False
    new["layouts"]["tp1pp1ep2"] = {"tp": 1, "pp": 1, "ep": 2, "skipped": "why"}
    new["roundtrip"]["bit_identical"] = False
    found = "\n".join(regressions(baseline, new))
    assert "qwen3_moe: roundtrip.bit_identical was true, now false" in found
    assert "qwen3_moe: layouts.tp1pp2 disappeared" in found
    assert "qwen3_moe: layouts.tp2pp1.logits_ok was true, now false" in found
    assert "qwen3_moe: layouts.tp2pp1.logits_max_abs_diff = 3.000e-03 exceeds" in found
    assert "qwen3_moe: layouts.tp1pp1ep2 is skipped now: why" in found

    new = copy.deepcopy(baseline)
    new["layouts"]["tp1pp2"].update(train_loss_max_rel=float("inf"), train_ok=False,
                                    train_error=None)
    found = regressions(baseline, new)
    assert any("layouts.tp1pp2.train_ok was true" in line for line in found), found
    assert any("layouts.tp1pp2.train_loss_max_rel = inf" in line for line in found), found
    assert regressions(new, copy.deepcopy(new)) == []  # a recorded failure is a known one


def test_layouts_parse_and_refuse_typos():
    assert parse_layouts("tp2pp1, tp1pp2,tp2pp1,tp1pp1ep2") == [
        Layout(2, 1), Layout(1, 2), Layout(1, 1, 2)]
    assert Layout(1, 1, 2).name == "tp1pp1ep2"
    for bad in ("tp2", "tp0pp1", "pp2tp1"):
        with pytest.raises(ValueError, match="tp<N>pp<N>"):
            Layout.parse(bad)


@pytest.mark.distributed
def test_cards_regenerate_without_regressions(tmp_path):
    """All committed cards, one torchrun launch, the committed settings; any regression fails."""
    cards = _committed()
    settings = {tuple(sorted(c["settings"].items())) for c in cards.values()}
    assert len(settings) == 1, "the cards were generated with different settings"
    setting = cards["qwen3"]["settings"]
    command = [sys.executable, "-m", "megatron_patch.cli", "card", "--hf-config",
               *(cards[name]["config"] for name in sorted(cards)), "--out-dir", str(tmp_path),
               "--baseline", str(CARDS), "--layouts", setting["layouts"],
               "--train-steps", str(setting["train_steps"]),
               "--seq-length", str(setting["seq_length"]),
               "--batch-size", str(setting["micro_batch_size"]), "--lr", str(setting["lr"]),
               "--seed", str(setting["seed"])]
    result = subprocess.run(command, cwd=REPO, capture_output=True, text=True, timeout=600,
                            env={**os.environ, "PYTHONWARNINGS": "ignore",
                                 "OMP_NUM_THREADS": "1"})
    assert result.returncode == 0, result.stdout[-6000:] + result.stderr[-3000:]
    for name, card in cards.items():
        new = read_card(tmp_path / f"{name}.md")
        assert list(new["layouts"]) == list(card["layouts"]), name
        assert new["config_sha256"] == card["config_sha256"], name


def test_random_model_is_deterministic(tmp_path):
    from megatron_patch.conversion.hf_io import HFCheckpoint
    from megatron_patch.conversion.tiny import save_random_model

    config = read_json(CONFIGS_DIR / "qwen3.json")
    a = HFCheckpoint(save_random_model(config, tmp_path / "a"))
    b = HFCheckpoint(save_random_model(config, tmp_path / "b"))
    assert all(torch.equal(a.get(n), b.get(n)) for n in a.names)
