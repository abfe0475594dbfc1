"""Compose the torchrun + Megatron-LM command of a launch from its settings and the hardware."""

from __future__ import annotations

import dataclasses
import os
import sys
from dataclasses import dataclass, field
from pathlib import Path

from megatron_patch.launch.flags import megatron_flags
from megatron_patch.launch.model_sizes import model_size_config
from megatron_patch.launch.settings import NO_CHECKPOINT, SHIPPED_DATA, LaunchError, RunSettings
from megatron_patch.models.registry import get_family
from megatron_patch.runtime.backends import Backends

ASSETS = Path(__file__).resolve().parents[1] / "assets"
ENTRY_POINTS = {"pretrain": "megatron_patch.training.pretrain",
                "finetune": "megatron_patch.training.finetune"}
SHIPPED_CHAT = ASSETS / "tiny_chat.jsonl"


@dataclass
class Launch:
    """What to run: optional preparation commands, then the training command, in ``env``."""

    name: str
    train: list[str]
    env: dict[str, str]
    prepare: list[list[str]] = field(default_factory=list)
    log_file: Path | None = None
    notes: list[str] = field(default_factory=list)


def _topology(settings: RunSettings, backends: Backends) -> dict[str, str]:
    """torchrun's node/process layout for ENV=dsw (this node) or ENV=dlc (multi-node job)."""
    model_parallel = settings.tp * settings.pp * settings.cp
    default_procs = backends.gpu_count if backends.cuda else model_parallel
    layout = {"nproc-per-node": os.environ.get("NPROC_PER_NODE", str(default_procs)),
              "nnodes": "1", "node-rank": "0", "master-addr": "localhost",
              "master-port": os.environ.get("MASTER_PORT", "6000")}
    if settings.env == "dlc":
        missing = [v for v in ("WORLD_SIZE", "RANK", "MASTER_ADDR", "MASTER_PORT")
                   if v not in os.environ]
        if missing:
            raise LaunchError(f"ENV=dlc reads the job's {missing} from the environment; unset")
        layout.update({"nnodes": os.environ["WORLD_SIZE"], "node-rank": os.environ["RANK"],
                       "master-addr": os.environ["MASTER_ADDR"],
                       "master-port": os.environ["MASTER_PORT"]})
    return layout


def _validate(settings: RunSettings, model: dict, world: int, backends: Backends) -> None:
    model_parallel = settings.tp * settings.pp * settings.cp
    checks = [
        (world % model_parallel == 0,
         f"{world} processes are not divisible by TP*PP*CP={model_parallel}"),
        (model["num_attention_heads"] % settings.tp == 0,
         f"TP={settings.tp} must divide the {model['num_attention_heads']} attention heads"),
        (model["num_query_groups"] % settings.tp == 0,
         f"TP={settings.tp} must divide the {model['num_query_groups']} key/value heads"),
        (model["num_layers"] % settings.pp == 0,
         f"PP={settings.pp} must divide the {model['num_layers']} layers"),
        (not settings.sp or settings.tp > 1, "SP=true needs TP>1"),
        (settings.cp == 1 or backends.transformer_engine,
         f"CP={settings.cp} needs Transformer Engine (pip install megatron-patch"
         "[transformer-engine]); the torch attention path supports CP=1 only"),
        (settings.pr != "fp8" or backends.transformer_engine,
         "PR=fp8 needs Transformer Engine (pip install megatron-patch[transformer-engine])"),
        (settings.pr not in ("bf16", "fp16", "fp8") or backends.cuda,
         f"PR={settings.pr} needs a GPU; use PR=fp32 (or auto) on the CPU"),
        (settings.warmup_iters < settings.train_iters,
         f"WARMUP_TOKENS gives {settings.warmup_iters} warm-up iterations, not fewer than the "
         f"{settings.train_iters} training iterations of TRAIN_TOKENS"),
    ]
    if world % model_parallel == 0:
        data_parallel = world // model_parallel
        checks.append((settings.global_batch_size % (settings.batch_size * data_parallel) == 0,
                       f"GLOBAL_BATCH_SIZE={settings.global_batch_size} must be a multiple of "
                       f"BATCH_SIZE*DP={settings.batch_size}*{data_parallel}"))
    for ok, message in checks:
        if not ok:
            raise LaunchError(message)


def _precision_flags(pr: str) -> list[str]:
    return {"fp32": [], "bf16": ["--bf16"], "fp16": ["--fp16", "--initial-loss-scale", "65536"],
            "fp8": ["--bf16", "--fp8-format", "hybrid", "--fp8-amax-history-len", "1024",
                    "--fp8-amax-compute-algo", "max"]}[pr]


def _recompute_flags(ac: str) -> list[str]:
    return {"none": [], "false": [], "sel": ["--recompute-activations"],
            "full": ["--recompute-granularity", "full", "--recompute-method", "uniform",
                     "--recompute-num-layers", "1"]}[ac]


def _run_name(family: str, mode: str, s: RunSettings, pr: str) -> str:
    return (f"{mode}-mcore-{family}-{s.model_size}-lr-{s.lr:g}-minlr-{s.min_lr:g}-bs-"
            f"{s.batch_size}-gbs-{s.global_batch_size}-seqlen-{s.seq_len}-pr-{pr}-tp-{s.tp}-pp-"
            f"{s.pp}-cp-{s.cp}-ac-{s.ac}-do-{str(s.do).lower()}-sp-{str(s.sp).lower()}-ti-"
            f"{s.train_iters}-wi-"
            f"{s.warmup_iters}")


def _tokenizer(settings: RunSettings) -> tuple[str, str | None]:
    """Tokenizer type and path: the shipped one for ``tiny``, else the model's own."""
    if settings.model_size == "tiny":
        return "TinyTokenizer", None
    path = os.environ.get("TOKENIZER_PATH", settings.pretrain_checkpoint_path)
    if path == NO_CHECKPOINT:
        raise LaunchError(f"MODEL_SIZE={settings.model_size} needs a tokenizer: set "
                          "TOKENIZER_PATH or give a converted PRETRAIN_CHECKPOINT_PATH")
    return "HFTokenizer", path


def _data(mode: str, settings: RunSettings, out: Path, kind: str, path: str | None
          ) -> tuple[list[list[str]], list[str]]:
    """Data flags, and the preprocessing step that builds the shipped corpus on first use.

    ``finetune`` reads chat data (JSONL or ``preprocess-sft`` output) directly; its shipped
    default is the tiny chat set, packed unless ``SFT_PACKING=false``.
    """
    if mode == "finetune":
        paths = [str(SHIPPED_CHAT)] if settings.dataset_path == SHIPPED_DATA \
            else settings.dataset_path.split()
        packing = os.environ.get("SFT_PACKING", "true").lower() not in ("false", "0")
        return [], ["--data-path", *paths, *(["--sft-packing"] if packing else [])]
    if settings.dataset_path != SHIPPED_DATA:
        return [], ["--data-path", *settings.dataset_path.split()]
    prefix = out / "data" / "tiny_corpus"
    document = f"{prefix}_text_document"
    prepare = []
    if not Path(document + ".bin").is_file():
        prepare.append([sys.executable, "-m", "megatron_patch.cli", "preprocess",
                        "--input", str(ASSETS / "tiny_corpus.jsonl"), "--output-prefix",
                        str(prefix), "--tokenizer-type", kind,
                        *(["--tokenizer-path", path] if path else []),
                        "--append-eod", "--workers", "2"])
    return prepare, ["--data-path", document]


def _checkpoint_flags(settings: RunSettings, save: Path) -> list[str]:
    """Resume from this run's own checkpoints if any, else start from the given checkpoint."""
    flags = ["--save", str(save), "--save-interval", str(settings.save_interval)]
    if (save / "latest_checkpointed_iteration.txt").is_file():
        return flags + ["--load", str(save)]
    if settings.pretrain_checkpoint_path != NO_CHECKPOINT:
        return flags + ["--load", settings.pretrain_checkpoint_path, "--finetune",
                        "--no-load-optim", "--no-load-rng"]
    return flags


def compose(family: str, mode: str, settings: RunSettings, extra: list[str],
            backends: Backends) -> Launch:
    """The full launch for ``family`` in ``mode`` ("pretrain" or "finetune").

    Fine-tuning trains on sequences of PAD_LEN tokens (samples padded or packed to it), which
    must not exceed SEQ_LEN.
    """
    pr = settings.pr if settings.pr != "auto" else ("bf16" if backends.cuda else "fp32")
    settings = dataclasses.replace(settings, pr=pr)
    if mode == "finetune":
        if settings.pad_len > settings.seq_len:
            raise LaunchError(f"PAD_LEN={settings.pad_len} must not exceed "
                              f"SEQ_LEN={settings.seq_len}")
        settings = dataclasses.replace(settings, seq_len=settings.pad_len)
    hf_config = model_size_config(family, settings.model_size)
    model = get_family(family).hf_to_megatron(hf_config)
    layout = _topology(settings, backends)
    world = int(layout["nproc-per-node"]) * int(layout["nnodes"])
    _validate(settings, model, world, backends)

    name = _run_name(family, mode, settings, pr)
    out = Path(settings.output_basepath).resolve()
    kind, tokenizer_path = _tokenizer(settings)
    prepare, data = _data(mode, settings, out, kind, tokenizer_path)
    tokenizer = ["--patch-tokenizer-type", kind]
    tokenizer += ["--patch-tokenizer-path", tokenizer_path] if tokenizer_path else []
    notes = []
    attention = []
    if settings.fl and backends.transformer_engine:
        attention = ["--attention-backend", "flash"]
    elif settings.fl:
        notes.append("FL=true: no Transformer Engine, attention runs on torch SDPA "
                     "(flash/cuDNN kernels on GPU)")
    parallel = ["--tensor-model-parallel-size", str(settings.tp),
                "--pipeline-model-parallel-size", str(settings.pp),
                "--context-parallel-size", str(settings.cp)]
    parallel += ["--sequence-parallel"] * settings.sp
    parallel += ["--use-distributed-optimizer"] * settings.do
    train = [
        "--model-family", family, *megatron_flags(model), *parallel,
        "--micro-batch-size", str(settings.batch_size),
        "--global-batch-size", str(settings.global_batch_size),
        "--seq-length", str(settings.seq_len),
        "--lr", f"{settings.lr:g}", "--min-lr", f"{settings.min_lr:g}",
        "--lr-decay-style", "cosine", "--lr-warmup-iters", str(settings.warmup_iters),
        "--lr-decay-iters", str(settings.train_iters), "--train-iters", str(settings.train_iters),
        "--weight-decay", "0.1", "--adam-beta1", "0.9", "--adam-beta2", "0.95",
        "--clip-grad", "1.0", "--seed", "1234",
        *_precision_flags(pr), *_recompute_flags(settings.ac), *attention,
        *data, "--split", "98,2,0", *tokenizer,
        *_checkpoint_flags(settings, out / "checkpoint" / name),
        "--log-interval", "10", "--eval-interval", str(max(1, settings.save_interval)),
        "--eval-iters", "5", "--tensorboard-dir", str(out / "tensorboard" / name),
        *extra,
    ]
    torchrun = [sys.executable, "-m", "torch.distributed.run",
                *(f"--{key}={value}" for key, value in layout.items()),
                "-m", ENTRY_POINTS[mode]]
    env: dict[str, str] = {}
    if backends.cuda:
        env["CUDA_DEVICE_MAX_CONNECTIONS"] = "1"
    elif int(layout["nproc-per-node"]) > 1:
        env["OMP_NUM_THREADS"] = str(max(1, (os.cpu_count() or 1) // int(layout["nproc-per-node"])))
    return Launch(name=name, train=torchrun + train, env=env, prepare=prepare,
                  log_file=out / "log" / f"{name}.log", notes=notes)
