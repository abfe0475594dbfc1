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
from megatron_patch.parallel_layout import LauncherWording, ParallelLayout
from megatron_patch.runtime.backends import Backends, flash_attention_backend

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


GPU_PRECISIONS = ("bf16", "fp16", "fp8")
GPUS_PER_NODE = 8  # a dry run's processes per node on GPUs it cannot see (NPROC_PER_NODE sets it)
JOB_VARIABLES = ("WORLD_SIZE", "RANK", "MASTER_ADDR", "MASTER_PORT")  # ENV=dlc: the job's
# Kinds of check (validate): "world" needs the process count, "hardware" the target's devices
# and libraries; a dry run reports them as notes where it only assumes those.
WORLD, HARDWARE = "world", "hardware"
TOKENIZER_PLACEHOLDER = "${TOKENIZER_PATH}"  # a dry run's tokenizer when none is given


def _composes_for_gpus_elsewhere(settings: RunSettings, backends: Backends, dry_run: bool) -> bool:
    """Whether a dry run on a machine without GPUs composes for GPU nodes: the settings ask for
    them (PR=bf16/fp16/fp8, or ENV=dlc, a cluster job)."""
    return dry_run and not backends.cuda and (settings.pr in GPU_PRECISIONS
                                              or settings.env == "dlc")


@dataclass(frozen=True)
class Topology:
    """torchrun's node/process flags, the process count the checks use, and what was assumed."""

    layout: dict[str, str]
    world: int
    assumed: list[str]  # notes: what a dry run could not read and assumed (empty: all known)


def _topology(settings: RunSettings, backends: Backends, dry_run: bool,
              elsewhere: bool) -> Topology:
    """The node/process layout for ENV=dsw (this node) or ENV=dlc (multi-node job).

    A dry run stands in for what only the target knows: ``GPUS_PER_NODE`` processes per node
    on GPUs it cannot see (``elsewhere``), and ``${WORLD_SIZE}``-style placeholders for the
    job's variables (the checks then assume one node).
    """
    # The smallest world the layout needs: dense and expert layouts both tile it.
    dense, expert = settings.tp * settings.cp, settings.ep * settings.expert_tp
    smallest = dense * expert // math.gcd(dense, expert) * settings.pp
    assumed = []
    nproc = os.environ.get("NPROC_PER_NODE")
    if nproc is None and elsewhere:
        nproc = str(GPUS_PER_NODE)
        assumed.append(f"NPROC_PER_NODE unset: {GPUS_PER_NODE} GPUs per node assumed (set it "
                       "to the target's count)")
    elif nproc is None:
        nproc = str(backends.gpu_count if backends.cuda else smallest)
    layout = {"nproc-per-node": nproc, "nnodes": "1", "node-rank": "0",
              "master-addr": "localhost", "master-port": os.environ.get("MASTER_PORT", "6000")}
    nodes = 1
    if settings.env == "dlc":
        missing = [v for v in JOB_VARIABLES if v not in os.environ]
        if missing and not dry_run:
            raise LaunchError(f"ENV=dlc reads the job's {missing} from the environment; unset")
        if missing:
            assumed.append(f"ENV=dlc: {', '.join(missing)} are the job's; shown as placeholders"
                           + (", checks assume one node" if "WORLD_SIZE" in missing else ""))
        job = {v: os.environ.get(v, f"${{{v}}}") for v in JOB_VARIABLES}
        layout.update({"nnodes": job["WORLD_SIZE"], "node-rank": job["RANK"],
                       "master-addr": job["MASTER_ADDR"], "master-port": job["MASTER_PORT"]})
        nodes = 1 if "WORLD_SIZE" in missing else int(job["WORLD_SIZE"])
    return Topology(layout, int(nproc) * nodes, assumed)


# The launcher's names of the layout's sizes (its settings and named flags).
LAUNCHER_NAMES = {"tp": "TP", "pp": "PP", "vpp": "VPP", "cp": "CP", "ep": "EP", "etp": "ETP",
                  "expert_tp": "ETP", "sp": "SP", "dp": "DP", "micro_batch": "BATCH_SIZE",
                  "global_batch": "GLOBAL_BATCH_SIZE", "seq": "SEQ_LEN"}
LAUNCHER_FIELDS = {"num_attention_heads": "the {} attention heads",
                   "num_query_groups": "the {} key/value heads", "num_layers": "the {} layers",
                   "ffn_hidden_size": "the FFN size {} (ffn_hidden_size)",
                   "num_experts": "the {} experts",
                   "moe_ffn_hidden_size": "the expert FFN size {} (moe_ffn_hidden_size)"}


def run_layout(settings: RunSettings, world: int) -> ParallelLayout:
    """The parallel layout of a launch on ``world`` processes."""
    s = settings
    return ParallelLayout(tp=s.tp, pp=s.pp, vpp=s.vpp if s.vpp > 1 else None, cp=s.cp, ep=s.ep,
                          etp=s.etp, sp=s.sp, world=world, micro_batch=s.batch_size,
                          global_batch=s.global_batch_size, seq=s.seq_len)


def validate(settings: RunSettings, model: dict, world: int, backends: Backends,
             as_notes: tuple[str, ...] = ()) -> list[str]:
    """Refuse a combination Megatron would reject (or run wrongly) later, naming the fix.

    ``model`` holds the Megatron argument values of the model size, ``world`` the process count.
    The parallel-layout rules are :class:`~megatron_patch.parallel_layout.ParallelLayout`'s.
    Failed checks of the kinds in ``as_notes`` (``WORLD``, ``HARDWARE``) are returned instead.
    """
    s = settings
    positions = model.get("max_position_embeddings") or s.seq_len
    wording = LauncherWording(LAUNCHER_NAMES, LAUNCHER_FIELDS, model=f"MODEL_SIZE={s.model_size}")
    checks = [
        (None, s.seq_len <= positions,
         f"SEQ_LEN={s.seq_len} exceeds the model's {positions} positions "
         "(max_position_embeddings); use --seq-len (SEQ_LEN/PAD_LEN) of at most that"),
        *((WORLD if problem.needs_world else None, False, problem.message(wording))
          for problem in run_layout(s, world).problems(model)),
        (HARDWARE, s.pr != "fp8" or backends.transformer_engine
         or importlib.util.find_spec("torchao") is not None,
         "PR=fp8 needs Transformer Engine or torchao (pip install 'megatron-patch[fp8]')"),
        (HARDWARE, s.pr not in GPU_PRECISIONS or backends.cuda,
         f"PR={s.pr} needs a GPU; use PR=fp32 (or auto) on the CPU"),
        (None, s.warmup_iters < s.train_iters,
         f"the {s.warmup_iters} warm-up iterations must be fewer than the {s.train_iters} "
         "training iterations (WARMUP_TOKENS/TRAIN_TOKENS or --warmup-iters/--train-iters)"),
    ]
    notes = []
    for kind, ok, message in checks:
        if ok:
            continue
        if kind not in as_notes:
            raise LaunchError(message)
        notes.append(f"check on the target: {message}")
    return notes


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
            f"{s.warmup_iters}" + (f"-lora-{s.lora}" if s.lora else ""))


def _tokenizer(settings: RunSettings, source: RunModel, dry_run: bool) -> tuple[str, str | None]:
    """Tokenizer type and path: TOKENIZER_PATH, the checkpoint's, the shipped one for ``tiny``,
    else the converted checkpoint's files (a dry run without one shows ``${TOKENIZER_PATH}``)."""
    if os.environ.get("TOKENIZER_PATH"):
        return "HFTokenizer", os.environ["TOKENIZER_PATH"]
    if source.tokenizer:
        return source.tokenizer
    if settings.model_size == "tiny":
        return "TinyTokenizer", None
    path = settings.pretrain_checkpoint_path
    if path == NO_CHECKPOINT and dry_run:
        return "HFTokenizer", TOKENIZER_PLACEHOLDER
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


def _checkpoint_flags(settings: RunSettings, save: Path, extra: list[str]) -> list[str]:
    """Resume from this run's own checkpoints in ``save`` if any, else start from the given
    checkpoint. With ``--lora R`` the given checkpoint is the frozen base of every run (its
    own checkpoints hold the adapters only).

    A resumed run's learning-rate schedule is this command's (Megatron's
    ``--override-opt_param-scheduler``): raising ``--train-iters`` trains further, as the
    "training is complete" message says, instead of failing Megatron's schedule check
    (unless ``extra`` asks for the checkpoint's schedule).
    """
    flags = ["--save", str(save), "--save-interval", str(settings.save_interval)]
    own = []
    if (save / "latest_checkpointed_iteration.txt").is_file():
        keep = "--use-checkpoint-opt_param-scheduler" in extra  # the user's choice wins
        own = ["--load", str(save)] + ["--override-opt_param-scheduler"] * (not keep)
    if settings.lora:
        if settings.pretrain_checkpoint_path == NO_CHECKPOINT:
            raise LaunchError(f"--lora {settings.lora} trains adapters on a given model: pass "
                              "PRETRAIN_CHECKPOINT_PATH (or --load) of a converted or trained "
                              "checkpoint")
        return flags + ["--lora-rank", str(settings.lora),
                        "--pretrained-checkpoint", settings.pretrain_checkpoint_path] + own
    if own:
        return flags + own
    if settings.pretrain_checkpoint_path != NO_CHECKPOINT:
        return flags + ["--load", settings.pretrain_checkpoint_path, "--finetune",
                        "--no-load-optim", "--no-load-rng"]
    return flags


def compose(family: str, mode: str, settings: RunSettings, extra: list[str],
            backends: Backends, dry_run: bool = False) -> Launch:
    """The full launch for ``family`` in ``mode`` ("pretrain" or "finetune"/"sft").

    Fine-tuning trains on sequences of PAD_LEN tokens (samples padded or packed to it), which
    must not exceed SEQ_LEN. A ``dry_run`` composes the job for its target from anywhere (a
    login node): on a machine without GPUs for GPU nodes when the settings ask for them, with
    placeholders for what only the job's environment gives, and the checks that need the
    target's hardware or process count as notes.
    """
    mode = MODES[mode]
    notes = []
    elsewhere = _composes_for_gpus_elsewhere(settings, backends, dry_run)
    if elsewhere:
        backends = dataclasses.replace(backends, cuda=True)
        reason = f"PR={settings.pr}" if settings.pr in GPU_PRECISIONS else "ENV=dlc"
        notes.append(f"DRY_RUN on a machine without GPUs: composed for GPU nodes ({reason})")
    pr = settings.pr if settings.pr != "auto" else ("bf16" if backends.cuda else "fp32")
    settings = dataclasses.replace(settings, pr=pr)
    if mode == "finetune":
        if settings.pad_len > settings.seq_len:
            raise LaunchError(f"PAD_LEN={settings.pad_len} must not exceed "
                              f"SEQ_LEN={settings.seq_len}")
        settings = dataclasses.replace(settings, seq_len=settings.pad_len)
    source = run_model(family, settings)
    settings, model = dataclasses.replace(settings, model_size=source.size), source.model
    topology = _topology(settings, backends, dry_run, elsewhere)
    notes += topology.assumed
    if settings.offload_fraction and not settings.do:
        notes.append("OPTIMIZER_OFFLOAD needs the distributed optimizer: DO=true")
        settings = dataclasses.replace(settings, do=True)
    as_notes = (WORLD,) * bool(topology.assumed) + (HARDWARE,) * elsewhere
    notes += validate(settings, model, topology.world, backends, as_notes)
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
    kind, tokenizer_path = _tokenizer(settings, source, dry_run)
    if tokenizer_path == TOKENIZER_PLACEHOLDER:
        notes.append(f"no tokenizer given (TOKENIZER_PATH or PRETRAIN_CHECKPOINT_PATH): shown "
                     f"as {TOKENIZER_PLACEHOLDER}")
    prepare, data = _data(mode, settings, out, kind, tokenizer_path)
    tokenizer = ["--patch-tokenizer-type", kind]
    tokenizer += ["--patch-tokenizer-path", tokenizer_path] if tokenizer_path else []
    attention = []
    if settings.fl:
        backend, runs_on = flash_attention_backend(backends)
        attention = ["--attention-backend", backend] if backend else []
        notes.append(f"FL=true: {runs_on}")
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
        *_checkpoint_flags(settings, run_files["save"], extra),
        "--log-interval", "10", "--eval-interval", str(max(1, settings.save_interval)),
        "--eval-iters", "5", "--tensorboard-dir", str(run_files["tensorboard"]),
        *extra,
    ]
    torchrun = [sys.executable, "-m", "torch.distributed.run",
                *(f"--{key}={value}" for key, value in topology.layout.items()),
                "-m", ENTRY_POINTS[mode]]
    env: dict[str, str] = {}
    if backends.cuda:
        env["CUDA_DEVICE_MAX_CONNECTIONS"] = "1"
    elif int(topology.layout["nproc-per-node"]) > 1:
        env["OMP_NUM_THREADS"] = str(max(1, (os.cpu_count() or 1)
                                         // int(topology.layout["nproc-per-node"])))
    return Launch(name=name, train=torchrun + train, env=env, prepare=prepare,
                  log_file=run_files["log"], notes=notes,
                  problems=input_problems(mode, settings, tokenizer_path),
                  save_dir=run_files["save"], train_iters=settings.train_iters)
