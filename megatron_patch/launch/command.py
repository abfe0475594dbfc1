"""Compose the torchrun + Megatron-LM command of a launch from its settings and the hardware."""

from __future__ import annotations

import dataclasses
import hashlib
import importlib.util
import math
import os
import sys
from dataclasses import dataclass, field
from pathlib import Path

from megatron_patch.launch.preflight import input_problems
from megatron_patch.launch.run_model import RunModel, run_model
from megatron_patch.launch.settings import (
    MODES,
    NO_CHECKPOINT,
    NO_PATH,
    SHIPPED_DATA,
    LaunchError,
    RunSettings,
)
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
    problems: list[str] = field(default_factory=list)  # missing inputs (launch/preflight.py)
    save_dir: Path | None = None
    train_iters: int = 0


def _topology(settings: RunSettings, backends: Backends) -> dict[str, str]:
    """torchrun's node/process layout for ENV=dsw (this node) or ENV=dlc (multi-node job)."""
    # The smallest world the layout needs: dense and expert layouts both tile it.
    dense, expert = settings.tp * settings.cp, settings.ep * settings.expert_tp
    smallest = dense * expert // math.gcd(dense, expert) * settings.pp
    default_procs = backends.gpu_count if backends.cuda else smallest
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


def validate(settings: RunSettings, model: dict, world: int, backends: Backends) -> None:
    """Refuse a combination Megatron would reject (or run wrongly) later, naming the fix.

    ``model`` holds the Megatron argument values of the model size, ``world`` the process count.
    """
    s = settings
    model_parallel = s.tp * s.pp * s.cp
    heads, groups, layers = (model["num_attention_heads"], model["num_query_groups"],
                             model["num_layers"])
    experts = model.get("num_experts")
    positions = model.get("max_position_embeddings") or s.seq_len
    checks = [
        (s.seq_len <= positions,
         f"SEQ_LEN={s.seq_len} exceeds the model's {positions} positions "
         "(max_position_embeddings); use --seq-len (SEQ_LEN/PAD_LEN) of at most that"),
        (world % model_parallel == 0,
         f"{world} processes are not divisible by TP*PP*CP={s.tp}*{s.pp}*{s.cp}"),
        (heads % s.tp == 0, f"TP={s.tp} must divide the {heads} attention heads"),
        (groups % s.tp == 0, f"TP={s.tp} must divide the {groups} key/value heads"),
        (layers % (s.pp * s.vpp) == 0,
         f"PP*VPP={s.pp}*{s.vpp} must divide the {layers} layers" if s.vpp > 1 else
         f"PP={s.pp} must divide the {layers} layers"),
        (s.vpp == 1 or s.pp > 1, f"VPP={s.vpp} (interleaved pipeline) needs PP>1"),
        (not s.sp or s.tp > 1, "SP=true needs TP>1"),
        (not s.sp or s.seq_len % s.tp == 0,
         f"SP=true splits the sequence over TP: SEQ_LEN={s.seq_len} must be a multiple of "
         f"TP={s.tp}"),
        (s.seq_len % (2 * s.cp) == 0,
         f"CP={s.cp} splits each sequence into 2*CP chunks: SEQ_LEN={s.seq_len} must be a "
         f"multiple of {2 * s.cp}"),
        (s.pr != "fp8" or backends.transformer_engine
         or importlib.util.find_spec("torchao") is not None,
         "PR=fp8 needs Transformer Engine or torchao (pip install 'megatron-patch[fp8]')"),
        (s.pr not in ("bf16", "fp16", "fp8") or backends.cuda,
         f"PR={s.pr} needs a GPU; use PR=fp32 (or auto) on the CPU"),
        (s.warmup_iters < s.train_iters,
         f"the {s.warmup_iters} warm-up iterations must be fewer than the {s.train_iters} "
         "training iterations (WARMUP_TOKENS/TRAIN_TOKENS or --warmup-iters/--train-iters)"),
        (experts or (s.ep == 1 and s.etp is None),
         f"EP={s.ep}/ETP={s.etp} need a mixture-of-experts model; MODEL_SIZE={s.model_size} "
         "has no experts"),
        (not experts or experts % s.ep == 0,
         f"EP={s.ep} must divide the {experts} experts"),
        (not experts or world % (s.ep * s.expert_tp * s.pp) == 0,
         f"{world} processes are not divisible by EP*ETP*PP={s.ep}*{s.expert_tp}*{s.pp}"),
        (not experts or s.ep == 1 or s.tp == 1 or s.sp,
         f"EP={s.ep} with TP={s.tp} needs SP=true (Megatron's expert dispatch expects "
         "sequence-parallel tokens)"),
    ]
    for ok, message in checks:
        if not ok:
            raise LaunchError(message)
    data_parallel = world // model_parallel
    if s.global_batch_size % (s.batch_size * data_parallel):
        raise LaunchError(f"GLOBAL_BATCH_SIZE={s.global_batch_size} must be a multiple of "
                          f"BATCH_SIZE*DP={s.batch_size}*{data_parallel}")
    microbatches = s.global_batch_size // (s.batch_size * data_parallel)
    if s.vpp > 1 and microbatches % s.pp:
        raise LaunchError(f"VPP={s.vpp} needs the {microbatches} micro-batches per step "
                          f"(GLOBAL_BATCH_SIZE/(BATCH_SIZE*DP)) to be a multiple of PP={s.pp}")


def precision_flags(pr: str) -> list[str]:
    """Megatron flags of a PR switch (fp32, bf16, fp16, fp8)."""
    return {"fp32": [], "bf16": ["--bf16"], "fp16": ["--fp16", "--initial-loss-scale", "65536"],
            "fp8": ["--bf16", "--fp8-format", "hybrid", "--fp8-amax-history-len", "1024",
                    "--fp8-amax-compute-algo", "max"]}[pr]


def recompute_flags(ac: str) -> list[str]:
    """Megatron flags of an AC switch (none/false, sel, full)."""
    return {"none": [], "false": [], "sel": ["--recompute-activations"],
            "full": ["--recompute-granularity", "full", "--recompute-method", "uniform",
                     "--recompute-num-layers", "1"]}[ac]


def _run_name(family: str, mode: str, s: RunSettings, pr: str) -> str:
    return (f"{mode}-mcore-{family}-{s.model_size}-lr-{s.lr:g}-minlr-{s.min_lr:g}-bs-"
            f"{s.batch_size}-gbs-{s.global_batch_size}-seqlen-{s.seq_len}-pr-{pr}-tp-{s.tp}-pp-"
            f"{s.pp}-cp-{s.cp}-ac-{s.ac}-do-{str(s.do).lower()}-sp-{str(s.sp).lower()}-ti-"
            f"{s.train_iters}-wi-"
            f"{s.warmup_iters}")


def _tokenizer(settings: RunSettings, source: RunModel) -> tuple[str, str | None]:
    """Tokenizer type and path: TOKENIZER_PATH, the checkpoint's, the shipped one for ``tiny``,
    else the converted checkpoint's files."""
    if os.environ.get("TOKENIZER_PATH"):
        return "HFTokenizer", os.environ["TOKENIZER_PATH"]
    if source.tokenizer:
        return source.tokenizer
    if settings.model_size == "tiny":
        return "TinyTokenizer", None
    path = settings.pretrain_checkpoint_path
    if path == NO_CHECKPOINT:
        raise LaunchError(f"MODEL_SIZE={settings.model_size} needs a tokenizer: set "
                          "TOKENIZER_PATH or give a converted PRETRAIN_CHECKPOINT_PATH")
    return "HFTokenizer", path


def _sources(train: list[str], settings: RunSettings) -> list[str]:
    """A blend split 98/2/0, or train and validation sets when VALID_DATASET_PATH is given."""
    if settings.valid_dataset_path == NO_PATH:
        return ["--data-path", *train, "--split", "98,2,0"]
    return ["--train-data-path", *train, "--valid-data-path",
            *settings.valid_dataset_path.split()]


def _data(mode: str, settings: RunSettings, out: Path, kind: str, path: str | None
          ) -> tuple[list[list[str]], list[str]]:
    """Data flags, and the preprocessing step that builds the shipped corpus on first use.

    ``finetune`` reads chat data (JSONL or ``preprocess-sft`` output) directly; its shipped
    default is the tiny chat set, packed unless ``--packing false`` (or ``SFT_PACKING=false``).
    """
    if mode == "finetune":
        paths = [str(SHIPPED_CHAT)] if settings.dataset_path == SHIPPED_DATA \
            else settings.dataset_path.split()
        packing = settings.packing
        if packing is None:
            packing = os.environ.get("SFT_PACKING", "true").lower() not in ("false", "0")
        return [], [*_sources(paths, settings), *(["--sft-packing"] if packing else [])]
    if settings.dataset_path != SHIPPED_DATA:
        return [], _sources(settings.dataset_path.split(), settings)
    prefix = out / "data" / ("tiny_corpus" if path is None else  # one per tokenizer
                             f"tiny_corpus_{hashlib.sha1(path.encode()).hexdigest()[:8]}")
    document = f"{prefix}_text_document"
    prepare = []
    if not Path(document + ".bin").is_file():
        prepare.append([sys.executable, "-m", "megatron_patch.cli", "preprocess",
                        "--input", str(ASSETS / "tiny_corpus.jsonl"), "--output-prefix",
                        str(prefix), "--tokenizer-type", kind,
                        *(["--tokenizer-path", path] if path else []),
                        "--append-eod", "--workers", "2"])
    return prepare, _sources([document], settings)


def parallel_flags(s: RunSettings, experts: int | None) -> list[str]:
    """Megatron flags of the parallel layout (TP/PP/VPP/CP/EP/ETP/SP/distributed optimizer)."""
    flags = ["--tensor-model-parallel-size", str(s.tp),
             "--pipeline-model-parallel-size", str(s.pp),
             "--context-parallel-size", str(s.cp)]
    if s.vpp > 1:
        flags += ["--num-virtual-stages-per-pipeline-rank", str(s.vpp)]
    if experts:
        flags += ["--expert-model-parallel-size", str(s.ep),
                  "--expert-tensor-parallel-size", str(s.expert_tp)]
    flags += ["--sequence-parallel"] * s.sp
    flags += ["--use-distributed-optimizer"] * s.do
    if s.offload_fraction:
        flags += ["--optimizer-cpu-offload", "--use-precision-aware-optimizer",
                  "--optimizer-offload-fraction", f"{s.offload_fraction:g}"]
    return flags


def _checkpoint_flags(settings: RunSettings, save: Path) -> list[str]:
    """Resume from this run's own checkpoints in ``save`` if any, else start from the given
    checkpoint."""
    flags = ["--save", str(save), "--save-interval", str(settings.save_interval)]
    if (save / "latest_checkpointed_iteration.txt").is_file():
        return flags + ["--load", str(save)]
    if settings.pretrain_checkpoint_path != NO_CHECKPOINT:
        return flags + ["--load", settings.pretrain_checkpoint_path, "--finetune",
                        "--no-load-optim", "--no-load-rng"]
    return flags


def compose(family: str, mode: str, settings: RunSettings, extra: list[str],
            backends: Backends) -> Launch:
    """The full launch for ``family`` in ``mode`` ("pretrain" or "finetune"/"sft").

    Fine-tuning trains on sequences of PAD_LEN tokens (samples padded or packed to it), which
    must not exceed SEQ_LEN.
    """
    mode = MODES[mode]
    pr = settings.pr if settings.pr != "auto" else ("bf16" if backends.cuda else "fp32")
    settings = dataclasses.replace(settings, pr=pr)
    if mode == "finetune":
        if settings.pad_len > settings.seq_len:
            raise LaunchError(f"PAD_LEN={settings.pad_len} must not exceed "
                              f"SEQ_LEN={settings.seq_len}")
        settings = dataclasses.replace(settings, seq_len=settings.pad_len)
    source = run_model(family, settings)
    settings, model = dataclasses.replace(settings, model_size=source.size), source.model
    layout = _topology(settings, backends)
    world = int(layout["nproc-per-node"]) * int(layout["nnodes"])
    notes = []
    if settings.offload_fraction and not settings.do:
        notes.append("OPTIMIZER_OFFLOAD needs the distributed optimizer: DO=true")
        settings = dataclasses.replace(settings, do=True)
    validate(settings, model, world, backends)
    if settings.warmup_shortened:
        notes.append(f"warm-up: {settings.warmup_iters} iterations, a tenth of the "
                     f"{settings.train_iters} training iterations (--warmup-iters sets it)")

    name = _run_name(family, mode, settings, pr)
    out = Path(settings.output_basepath).resolve()
    # A --save directory elsewhere also holds the run's TensorBoard and log files.
    save = Path(settings.save_path).resolve() if settings.save_path else None
    run_files = {"save": save or out / "checkpoint" / name,
                 "tensorboard": save / "tensorboard" if save else out / "tensorboard" / name,
                 "log": save / "log" / f"{name}.log" if save else out / "log" / f"{name}.log"}
    kind, tokenizer_path = _tokenizer(settings, source)
    prepare, data = _data(mode, settings, out, kind, tokenizer_path)
    tokenizer = ["--patch-tokenizer-type", kind]
    tokenizer += ["--patch-tokenizer-path", tokenizer_path] if tokenizer_path else []
    attention = []
    if settings.fl and backends.transformer_engine:
        attention = ["--attention-backend", "flash"]
    elif settings.fl:
        notes.append("FL=true: no Transformer Engine, attention runs on torch SDPA "
                     "(flash/cuDNN kernels on GPU)")
    train = [
        "--model-family", family, *source.flags,
        *parallel_flags(settings, model.get("num_experts")),
        "--micro-batch-size", str(settings.batch_size),
        "--global-batch-size", str(settings.global_batch_size),
        "--seq-length", str(settings.seq_len),
        "--lr", f"{settings.lr:g}", "--min-lr", f"{settings.min_lr:g}",
        "--lr-decay-style", "cosine", "--lr-warmup-iters", str(settings.warmup_iters),
        "--lr-decay-iters", str(settings.train_iters), "--train-iters", str(settings.train_iters),
        "--weight-decay", "0.1", "--adam-beta1", "0.9", "--adam-beta2", "0.95",
        "--clip-grad", "1.0", "--seed", "1234",
        *precision_flags(pr), *recompute_flags(settings.ac), *attention,
        *data, *tokenizer,
        *_checkpoint_flags(settings, run_files["save"]),
        "--log-interval", "10", "--eval-interval", str(max(1, settings.save_interval)),
        "--eval-iters", "5", "--tensorboard-dir", str(run_files["tensorboard"]),
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
                  log_file=run_files["log"], notes=notes,
                  problems=input_problems(mode, settings, tokenizer_path),
                  save_dir=run_files["save"], train_iters=settings.train_iters)
