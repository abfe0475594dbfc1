"""``megatron-patch card``: generate verification cards from HF configs.

    megatron-patch card --hf-config CONFIG.json|HF_DIR [--tiny] --out cards/<name>.md
        [--layouts tp1pp1,tp2pp1,tp1pp2,tp1pp1ep2] [--train-steps 5] [--baseline CARD]
    megatron-patch card --hf-config cards/configs/*.json --out-dir cards [--baseline cards]

For every config: build a random model with transformers (``--tiny`` first shrinks a full-size
config, keeping its structure), convert it to Megatron (``torch_dist``, no vocabulary padding),
convert it back and compare the tensors bit for bit, then at every layout compare the logits
(``megatron-patch verify``) and N training steps (``verify --train-steps``) with transformers.
The multi-process work of all configs runs in one torchrun launch (relaunched the way
``megatron-patch verify`` does), sized for the largest layout; smaller layouts run data
parallel over the remaining ranks. Layouts the model cannot take (e.g. TP not dividing one
key/value head) are recorded as skipped; EP layouts are left out for dense models.

Exits 1 if a check fails or, with ``--baseline`` (a card, or a directory of cards with the same
names), only on regressions: a check that passed there fails now, a layout disappeared or a
difference exceeds the baseline's tolerance; each is printed naming the card and field.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import shlex
import sys
import tempfile
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from megatron_patch.conversion.verify.card import (
    CARD_VERSION,
    Layout,
    config_digest,
    layout_problem,
    layout_record,
    parse_layouts,
    read_card,
    regressions,
    render_index,
    tool_versions,
    write_card,
)
from megatron_patch.runtime.exact_fp32 import restart_with_exact_fp32
from megatron_patch.utils.files import atomic_write_text

DEFAULT_LAYOUTS = "tp1pp1,tp2pp1,tp1pp2,tp1pp1ep2"


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="megatron-patch card",
                                     description="Verification cards: logits, round trip and "
                                                 "training against transformers, per layout.")
    parser.add_argument("--hf-config", nargs="+", default=[],
                        help="HF config.json file(s) or HF model directories")
    parser.add_argument("--tiny", action="store_true",
                        help="shrink the config first (hidden 64, 4 layers, <= 8 experts, ...)")
    parser.add_argument("--out", default=None, help="card file (one config)")
    parser.add_argument("--out-dir", default=None,
                        help="directory for <config name>.md cards (several configs)")
    parser.add_argument("--layouts", default=DEFAULT_LAYOUTS,
                        help="comma-separated tp<N>pp<N>[ep<N>] (default %(default)s)")
    parser.add_argument("--train-steps", type=int, default=5,
                        help="AdamW steps compared per layout (0: none)")
    parser.add_argument("--seq-length", type=int, default=16)
    parser.add_argument("--batch-size", type=int, default=2, help="micro-batch size")
    parser.add_argument("--lr", type=float, default=1e-3, help="peak learning rate")
    parser.add_argument("--seed", type=int, default=0, help="random weights and data")
    parser.add_argument("--tolerance", type=float, default=1e-4,
                        help="largest accepted max abs logits difference (fp32)")
    parser.add_argument("--train-tolerance", type=float, default=1e-4,
                        help="largest accepted relative loss / gradient-norm gap per step")
    parser.add_argument("--index", default=None,
                        help="(re)write this Markdown index of the cards in its directory")
    parser.add_argument("--baseline", default=None,
                        help="committed card (or directory of cards) to check for regressions")
    parser.add_argument("--worker", nargs=2, metavar=("JOBS", "OUT"), help=argparse.SUPPRESS)
    return parser


@dataclasses.dataclass
class _Prepared:
    """One config's model, conversion and round-trip result, and its layouts."""

    name: str
    source: str
    config: dict[str, Any]
    hf_config: dict[str, Any]
    family: str
    roundtrip: dict[str, Any]
    layouts: dict[Layout, str | None]  # layout -> why it is skipped (None: it runs)
    jobs: list[dict[str, Any]]
    sequence_parallel: set[Layout]  # layouts run with --sequence-parallel


def _compare_tensors(expected_dir: Path, got_dir: Path) -> dict[str, Any]:
    """Whether two HF directories hold bit-identical tensors."""
    import torch

    from megatron_patch.conversion.hf_io import HFCheckpoint

    expected, got = HFCheckpoint(expected_dir), HFCheckpoint(got_dir)
    problems = sorted(set(expected.names) ^ set(got.names))
    for name in sorted(set(expected.names) & set(got.names)):
        a, b = expected.get(name), got.get(name)
        if a.dtype != b.dtype or not torch.equal(a, b):
            problems.append(name)
    record = {"format": "torch_dist", "tensors": len(expected.names),
              "bit_identical": not problems}
    if problems:
        record["detail"] = f"{len(problems)} tensors differ or are missing, first {problems[0]}"
    return record


def _prepare(source: str, name: str, args: argparse.Namespace, layouts: list[Layout],
             work: Path) -> _Prepared:
    from megatron_patch.conversion import convert_hf_to_mcore, convert_mcore_to_hf
    from megatron_patch.conversion.tiny import load_config_json, save_random_model, shrink_config
    from megatron_patch.models.common.hf_config import load_hf_config
    from megatron_patch.models.registry import family_for_hf_config

    config = load_config_json(source)
    if args.tiny:
        config = shrink_config(config)
    root = work / name
    hf_dir = save_random_model(config, root / "hf", seed=args.seed)
    hf_config = load_hf_config(hf_dir)
    family = family_for_hf_config(hf_config)
    model = family.hf_to_megatron(hf_config)
    mcore = convert_hf_to_mcore(hf_dir, root / "mcore", progress=False,
                                make_vocab_size_divisible_by=1)
    roundtrip = _compare_tensors(hf_dir, convert_mcore_to_hf(mcore, root / "back",
                                                             progress=False))
    chosen = {layout: layout_problem(model, layout) for layout in layouts
              if layout.ep == 1 or model.get("num_experts")}
    jobs = []
    # Megatron requires sequence parallelism for a mixture-of-experts model at TP > 1
    sequence_parallel = {layout for layout in chosen if model.get("num_experts") and layout.tp > 1}
    for layout, problem in chosen.items():
        if problem is not None:
            continue
        sp = ["--sequence-parallel"] if layout in sequence_parallel else []
        common = {"hf": str(hf_dir), "mcore": str(mcore), "tp": layout.tp, "pp": layout.pp,
                  "ep": layout.ep, "seq_length": args.seq_length,
                  "batch_size": args.batch_size, "seed": args.seed, "extra_args": sp}
        jobs.append({"id": f"{name}/{layout.name}/logits", "kind": "logits", **common})
        if args.train_steps:
            jobs.append({"id": f"{name}/{layout.name}/train", "kind": "train",
                         "steps": args.train_steps, "lr": args.lr, **common})
    return _Prepared(name, source, config, hf_config, family.name, roundtrip, chosen, jobs,
                     sequence_parallel)


def _worker(jobs_file: str, out_file: str) -> int:
    """Every rank: run the jobs; rank 0 writes ``{job id: result}``. Output goes to a log."""
    rank = int(os.environ.get("RANK", "0"))
    log = os.open(Path(out_file).with_name(f"worker-rank{rank}.log"),
                  os.O_WRONLY | os.O_CREAT | os.O_TRUNC)
    os.dup2(log, 1)
    os.dup2(log, 2)
    import torch

    from megatron_patch.conversion.verify.logits import compare_logits
    from megatron_patch.conversion.verify.training import Hyper, compare_training

    results: dict[str, Any] = {}
    for job in json.loads(Path(jobs_file).read_text()):
        layout = {key: job[key] for key in ("tp", "pp", "ep", "batch_size", "seq_length",
                                            "seed", "extra_args")}
        print(f"=== {job['id']}", flush=True)
        try:
            if job["kind"] == "logits":
                results[job["id"]] = compare_logits(job["hf"], job["mcore"], **layout)
            else:
                curves = compare_training(job["hf"], job["mcore"], steps=job["steps"],
                                          hyper=Hyper(lr=job["lr"], min_lr=job["lr"] / 10),
                                          **layout)
                results[job["id"]] = dataclasses.asdict(curves)
        except Exception as error:  # recorded in the card; the other jobs still run
            results[job["id"]] = {"error": f"{type(error).__name__}: {error}"}
    if rank == 0:
        atomic_write_text(out_file, json.dumps(results))
    torch.distributed.destroy_process_group()
    return 0


def _run_jobs(jobs: list[dict[str, Any]], world: int, work: Path) -> dict[str, Any]:
    from megatron_patch.utils.torchrun import relaunch

    jobs_file, out_file = work / "jobs.json", work / "results.json"
    jobs_file.write_text(json.dumps(jobs))
    code = relaunch(__name__, ["--worker", str(jobs_file), str(out_file)], world)
    if code != 0 or not out_file.is_file():
        logs = "".join(f"--- {log.name} (last lines)\n" + "\n".join(
            log.read_text(errors="replace").splitlines()[-40:]) + "\n"
            for log in sorted(work.glob("worker-rank*.log")))
        raise SystemExit(f"megatron-patch card: the torchrun workers failed (exit {code})\n"
                         f"{logs}")
    return json.loads(out_file.read_text())


def _card(prepared: _Prepared, results: dict[str, Any], world: int,
          args: argparse.Namespace, command: str) -> dict[str, Any]:
    import torch

    tolerances = {"logits_max_abs": args.tolerance, "train_rel": args.train_tolerance}
    layouts: dict[str, Any] = {}
    for layout, problem in prepared.layouts.items():
        if problem is not None:
            layouts[layout.name] = {"tp": layout.tp, "pp": layout.pp, "ep": layout.ep,
                                    "skipped": problem}
            continue
        prefix = f"{prepared.name}/{layout.name}/"
        layouts[layout.name] = layout_record(layout, world, results[prefix + "logits"],
                                             results.get(prefix + "train"), tolerances)
        if layout in prepared.sequence_parallel:
            layouts[layout.name]["sequence_parallel"] = True
    return {
        "card_version": CARD_VERSION,
        "name": prepared.name,
        "family": prepared.family,
        "architecture": (prepared.hf_config.get("architectures") or ["?"])[0],
        "config": prepared.source,
        "config_sha256": config_digest(prepared.config),
        "tiny": bool(args.tiny),
        "settings": {"precision": "fp32", "device": "cuda" if torch.cuda.is_available()
                     else "cpu", "world_size": world, "seq_length": args.seq_length,
                     "micro_batch_size": args.batch_size, "train_steps": args.train_steps,
                     "lr": args.lr, "seed": args.seed, "layouts": args.layouts},
        "tolerances": tolerances,
        "roundtrip": prepared.roundtrip,
        "layouts": layouts,
        "versions": tool_versions(),
        "command": command,
    }


def _command(source: str, out: Path, args: argparse.Namespace) -> str:
    """The command that regenerates one card with the same settings."""
    return shlex.join(["megatron-patch", "card", "--hf-config", source,
                       *(["--tiny"] if args.tiny else []), "--out", str(out),
                       "--layouts", args.layouts, "--train-steps", str(args.train_steps),
                       "--seq-length", str(args.seq_length), "--batch-size",
                       str(args.batch_size), "--lr", str(args.lr), "--seed", str(args.seed)])


def card_ok(card: dict[str, Any]) -> bool:
    """Every check of a card passed."""
    return card["roundtrip"]["bit_identical"] and all(
        entry.get("logits_ok", True) and entry.get("train_ok", True)
        for entry in card["layouts"].values())


def _names(args: argparse.Namespace) -> list[str]:
    if args.out:
        return [Path(args.out).stem]
    names = [Path(source).stem if Path(source).is_file() else Path(source).name
             for source in args.hf_config]
    duplicates = sorted({n for n in names if names.count(n) > 1})
    if duplicates:
        raise SystemExit(f"megatron-patch card: several configs would write {duplicates}.md")
    return names


def _baseline(args: argparse.Namespace, name: str) -> dict[str, Any] | None:
    if not args.baseline:
        return None
    path = Path(args.baseline)
    path = path / f"{name}.md" if path.is_dir() else path
    return read_card(path) if path.is_file() else None


def main(argv: Sequence[str] | None = None) -> int:
    """Run ``megatron-patch card ...``; 0 when every check passed and nothing regressed."""
    argv = list(sys.argv[1:] if argv is None else argv)
    args = _parser().parse_args(argv)
    if args.worker:
        return _worker(*args.worker)
    restart_with_exact_fp32("card", argv)
    if not args.hf_config:
        raise SystemExit("megatron-patch card: give --hf-config CONFIG.json|HF_DIR")
    if bool(args.out) == bool(args.out_dir) or (args.out and len(args.hf_config) > 1):
        raise SystemExit("megatron-patch card: give --out CARD.md for one config or "
                         "--out-dir DIR for several")
    try:
        layouts = parse_layouts(args.layouts)
    except ValueError as error:
        raise SystemExit(f"megatron-patch card: --layouts: {error}") from None
    from megatron_patch.conversion.verify.logits import world_size

    names = _names(args)
    with tempfile.TemporaryDirectory(prefix="megatron-patch-card-") as tmp:
        work = Path(tmp)
        prepared = [_prepare(source, name, args, layouts, work)
                    for source, name in zip(args.hf_config, names)]
        runnable = [layout for p in prepared for layout, problem in p.layouts.items()
                    if problem is None]
        world = max([world_size(lay.tp, lay.pp, lay.ep) for lay in runnable], default=1)
        jobs = [job for p in prepared for job in p.jobs]
        results = _run_jobs(jobs, world, work) if jobs else {}
    status = 0
    for item, name in zip(prepared, names):
        out = Path(args.out) if args.out else Path(args.out_dir) / f"{name}.md"
        card = _card(item, results, world, args, _command(item.source, out, args))
        baseline = _baseline(args, item.name)  # before writing: it may be the same file
        found = regressions(baseline, card) if baseline is not None else []
        path = write_card(out, card)
        # against a baseline only regressions fail: a failure it records is a known one
        ok = not found if baseline is not None else card_ok(card)
        status = status or (0 if ok else 1)
        print(f"{path}: {'OK' if card_ok(card) else 'FAILED'}"
              + (f", {len(found)} regressions against {args.baseline}" if found else ""))
        for line in found:
            print(f"  REGRESSION {line}")
    if args.index:
        _write_index(Path(args.index), args)
    return status


def _write_index(path: Path, args: argparse.Namespace) -> None:
    """Index of every card next to ``path`` (this run's and earlier ones)."""
    cards = {card.stem: read_card(card) for card in sorted(path.parent.glob("*.md"))
             if card.resolve() != path.resolve()}
    out = args.out_dir or str(Path(args.out).parent)
    configs = sorted({card["config"] for card in cards.values()})
    folders = {str(Path(config).parent) for config in configs}
    if len(folders) == 1 and all(config.endswith(".json") for config in configs):
        configs = [f"{folders.pop()}/*.json"]  # a shell glob, left unquoted
    command = " ".join(["megatron-patch", "card", "--hf-config", *configs, shlex.join([
        "--out-dir", out, "--index", str(path), "--layouts", args.layouts,
        "--train-steps", str(args.train_steps)])])
    atomic_write_text(path, render_index(cards, command))
    print(f"{path}: index of {len(cards)} cards")


if __name__ == "__main__":
    sys.exit(main())
