"""Verification cards: what was checked for a model family, in one small Markdown file.

A card is the record of one run of ``megatron-patch card`` on an HF config: the layouts tried,
the max-abs logits difference to transformers at each, whether HF -> Megatron -> HF is
bit-identical, the relative loss / gradient-norm gap of N training steps against transformers +
torch's AdamW, and the tool versions. Its YAML front matter is the machine-readable record;
:func:`regressions` compares a regenerated card with a committed one.
"""

from __future__ import annotations

import hashlib
import json
import platform
import re
from collections.abc import Mapping
from dataclasses import dataclass
from importlib import metadata
from pathlib import Path
from typing import Any

import yaml

from megatron_patch.parallel_layout import TRAINING, ParallelLayout, Wording
from megatron_patch.utils.files import atomic_write_text

CARD_VERSION = 1
_LAYOUT = re.compile(r"^tp(\d+)pp(\d+)(?:ep(\d+))?$")
_FRONT_MATTER = re.compile(r"\A---\n(.*?)\n---\n", re.DOTALL)


@dataclass(frozen=True)
class Layout:
    """A parallel layout: tensor, pipeline and expert parallel sizes (expert TP = TP)."""

    tp: int = 1
    pp: int = 1
    ep: int = 1

    @property
    def name(self) -> str:
        """``tp2pp1`` or ``tp1pp1ep2``."""
        return f"tp{self.tp}pp{self.pp}" + (f"ep{self.ep}" if self.ep > 1 else "")

    @classmethod
    def parse(cls, text: str) -> Layout:
        """``tp<N>pp<N>[ep<N>]``."""
        match = _LAYOUT.match(text.strip())
        if not match or 0 in [int(g) for g in match.groups() if g]:
            raise ValueError(f"layout {text!r}: expected tp<N>pp<N>[ep<N>], e.g. tp2pp1, "
                             "tp1pp1ep2")
        tp, pp, ep = match.groups()
        return cls(int(tp), int(pp), int(ep or 1))


def parse_layouts(text: str) -> list[Layout]:
    """Comma-separated layouts, duplicates dropped."""
    return list(dict.fromkeys(Layout.parse(part) for part in text.split(",") if part.strip()))


# A card's names of the layout's sizes (its layout names: tp2pp1ep2).
CARD_WORDING = Wording({"tp": "TP", "pp": "PP", "ep": "EP", "expert_tp": "ETP"})


def layout_problem(model: Mapping[str, Any], layout: Layout) -> str | None:
    """Why ``layout`` cannot run this model (Megatron args of the family mapping), or None
    (:class:`~megatron_patch.parallel_layout.ParallelLayout`'s rules)."""
    problems = ParallelLayout(tp=layout.tp, pp=layout.pp, ep=layout.ep, sp=None).problems(model)
    return next((p.message(CARD_WORDING) for p in problems if p.kind != TRAINING), None)


def tool_versions() -> dict[str, str]:
    """Versions of the tools a card's numbers depend on."""
    from megatron_patch import __version__

    found = {"python": platform.python_version(), "megatron-patch": __version__}
    for name in ("megatron-core", "transformers", "torch"):
        try:
            found[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            found[name] = "not installed"
    return found


def config_digest(config: Mapping[str, Any]) -> str:
    """sha256 of a config dict (sorted JSON): which tiny model a card was generated from."""
    return hashlib.sha256(json.dumps(config, sort_keys=True).encode()).hexdigest()


def layout_record(layout: Layout, world: int, logits: Any, curves: Any,
                  tolerances: Mapping[str, float]) -> dict[str, Any]:
    """One layout's entry: ``logits`` a float or ``{"error"}``, ``curves`` a dict of the four
    training curves, ``{"error"}`` or None (no training)."""
    record: dict[str, Any] = {"tp": layout.tp, "pp": layout.pp, "ep": layout.ep,
                              "dp": world // (layout.tp * layout.pp)}
    if isinstance(logits, dict):
        record["logits_error"] = logits["error"]
        record["logits_ok"] = False
    else:
        record["logits_max_abs_diff"] = float(logits)
        record["logits_ok"] = float(logits) <= tolerances["logits_max_abs"]
    if isinstance(curves, dict) and "error" in curves:
        record["train_error"] = curves["error"]
        record["train_ok"] = False
    elif curves is not None:
        rel = _relative(curves["megatron_loss"], curves["hf_loss"])
        grad = _relative(curves["megatron_grad_norm"], curves["hf_grad_norm"])
        record.update(
            train_steps=len(rel),
            train_loss_max_rel=max(rel), train_grad_norm_max_rel=max(grad),
            train_loss_max_abs_gap=max(abs(a - b) for a, b in
                                       zip(curves["megatron_loss"], curves["hf_loss"])),
            train_final_loss={"megatron": curves["megatron_loss"][-1],
                              "hf": curves["hf_loss"][-1]},
            train_ok=all(r <= tolerances["train_rel"] for r in rel + grad))
    return record


def _relative(mine: list[float], reference: list[float]) -> list[float]:
    # NaN compares false with everything: it becomes inf so that it fails and stays YAML
    gaps = [abs(a - b) / max(abs(b), 1e-12) for a, b in zip(mine, reference)]
    return [g if g == g else float("inf") for g in gaps]


def render_card(card: Mapping[str, Any]) -> str:
    """The card file: YAML front matter, then a human-readable summary."""
    front = yaml.safe_dump(dict(card), sort_keys=False, default_flow_style=False, width=100)
    roundtrip = card["roundtrip"]
    lines = [f"---\n{front}---", "",
             f"# Verification card: {card['name']} ({card['architecture']}, family "
             f"`{card['family']}`)", "",
             f"Tiny random model from `{card['config']}`; fp32 on "
             f"{card['settings']['device']}, {card['settings']['world_size']} processes; "
             f"{card['settings']['train_steps']} AdamW steps against transformers + "
             "torch.optim.AdamW.", "",
             "| layout | logits max abs diff | train loss max rel | grad norm max rel | result |",
             "|---|---|---|---|---|"]
    for name, entry in card["layouts"].items():
        if "skipped" in entry:
            lines.append(f"| {name} | - | - | - | skipped: {entry['skipped']} |")
            continue
        logits = _fmt(entry.get("logits_max_abs_diff"), entry.get("logits_error"))
        loss = _fmt(entry.get("train_loss_max_rel"), entry.get("train_error"))
        grad = _fmt(entry.get("train_grad_norm_max_rel"), entry.get("train_error"))
        ok = entry["logits_ok"] and entry.get("train_ok", True)
        lines.append(f"| {name} | {logits} | {loss} | {grad} | {'OK' if ok else 'FAILED'} |")
    tol = card["tolerances"]
    lines += ["", f"Tolerances: logits max abs {tol['logits_max_abs']:g}, training relative "
                  f"{tol['train_rel']:g} per step (loss and gradient norm).", "",
              f"Round trip HF -> Megatron ({roundtrip['format']}) -> HF: "
              + ("bit-identical" if roundtrip["bit_identical"] else
                 f"NOT bit-identical ({roundtrip.get('detail', '')})")
              + f", {roundtrip['tensors']} tensors.", "",
              "Versions: " + ", ".join(f"{k} {v}" for k, v in card["versions"].items()) + ".",
              "", f"Regenerate: `{card['command']}`", ""]
    return "\n".join(lines)


def _fmt(value: float | None, error: str | None) -> str:
    if error:
        return "error"
    return "-" if value is None else f"{value:.2e}"


def write_card(path: str | Path, card: Mapping[str, Any]) -> Path:
    """Write the card atomically (temporary file + rename)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_text(path, render_card(card))
    return path


def read_card(path: str | Path) -> dict[str, Any]:
    """The front matter of a card file."""
    text = Path(path).read_text()
    match = _FRONT_MATTER.match(text)
    if not match:
        raise ValueError(f"{path}: no YAML front matter (--- ... ---) at the top")
    return yaml.safe_load(match.group(1))


def render_index(cards: Mapping[str, Mapping[str, Any]], command: str) -> str:
    """A Markdown index of cards (name -> front matter), worst numbers per card."""
    lines = ["# Verification cards", "",
             "One card per model family: a tiny random model built from the HF config in "
             "`configs/`, converted to Megatron and back, compared with transformers at every "
             "layout (logits, and training against transformers + torch.optim.AdamW). The "
             "YAML front matter of each card is the machine-readable record; "
             "`tests/conversion/test_cards.py` regenerates every card and fails on a "
             "regression.", "",
             f"Regenerate all: `{command}`", "",
             "| card | family | architecture | layouts passed | max logits diff | "
             "max train rel (loss / grad norm) | round trip |",
             "|---|---|---|---|---|---|---|"]
    for name, card in sorted(cards.items()):
        ran = {k: v for k, v in card["layouts"].items() if "skipped" not in v}
        passed = [k for k, v in ran.items() if v["logits_ok"] and v.get("train_ok", True)]
        skipped = len(card["layouts"]) - len(ran)
        logits = max((v.get("logits_max_abs_diff", float("inf")) for v in ran.values()),
                     default=None)
        loss = max((v["train_loss_max_rel"] for v in ran.values()
                    if "train_loss_max_rel" in v), default=None)
        grad = max((v["train_grad_norm_max_rel"] for v in ran.values()
                    if "train_grad_norm_max_rel" in v), default=None)
        lines.append(
            f"| [{name}]({name}.md) | `{card['family']}` | {card['architecture']} | "
            f"{len(passed)}/{len(ran)} ({', '.join(passed) or 'none'})"
            + (f", {skipped} skipped" if skipped else "") + f" | {_fmt(logits, None)} | "
            f"{_fmt(loss, None)} / {_fmt(grad, None)} | "
            + ("bit-identical" if card["roundtrip"]["bit_identical"] else "DIFFERS") + " |")
    return "\n".join(lines) + "\n"


def regressions(baseline: Mapping[str, Any], new: Mapping[str, Any]) -> list[str]:
    """What the regenerated card ``new`` lost against ``baseline``, one line each, naming the
    card and field: a check that passed and fails now, a layout that disappeared or is
    skipped now, or a difference over the baseline's tolerance (failures the baseline records
    are known ones, not regressions)."""
    name = baseline.get("name", "?")
    tolerances = baseline["tolerances"]
    found = []
    if baseline["roundtrip"]["bit_identical"] and not new["roundtrip"]["bit_identical"]:
        found.append(f"{name}: roundtrip.bit_identical was true, now false "
                     f"({new['roundtrip'].get('detail', '')})")
    limits = {"logits_max_abs_diff": tolerances["logits_max_abs"],
              "train_loss_max_rel": tolerances["train_rel"],
              "train_grad_norm_max_rel": tolerances["train_rel"]}
    for layout, old in baseline["layouts"].items():
        entry = new["layouts"].get(layout)
        where = f"{name}: layouts.{layout}"
        if entry is None:
            found.append(f"{where} disappeared")
            continue
        if "skipped" in entry and "skipped" not in old:
            found.append(f"{where} is skipped now: {entry['skipped']}")
            continue
        for check in ("logits_ok", "train_ok"):
            if old.get(check) and not entry.get(check):
                error = entry.get(check.replace("_ok", "_error"))
                found.append(f"{where}.{check} was true, now false"
                             + (f": {error}" if error else ""))
        for field, limit in limits.items():
            value, committed = entry.get(field), old.get(field)
            known = committed is not None and not committed <= limit  # a recorded failure
            if value is not None and not known and not value <= limit:
                found.append(f"{where}.{field} = {value:.3e} exceeds tolerance {limit:g} "
                             f"(committed: {committed})")
    return found
