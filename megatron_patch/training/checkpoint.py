"""Crash-safe training checkpoints, and checks of a checkpoint before it is loaded.

Megatron-LM writes ``iter_N/`` in place and then rewrites ``latest_checkpointed_iteration.txt``
(truncate, then write), so a process killed while saving can leave a partial ``iter_N`` or an
empty tracker. :func:`save_checkpoint_atomic` lets Megatron write the checkpoint (same format,
same layout) into the staging directory ``<save>/.saving``; rank 0 then fsyncs it, renames
``iter_N`` into ``<save>`` and only then replaces the tracker (temporary file, fsync, rename).
The tracker therefore only ever names a complete checkpoint, and a failed save (a full disk)
leaves the previous one as it was.

:func:`check_checkpoint_before_load` runs before the model is built: the tracker must name a
checkpoint that exists, every shard file it lists must be present and long enough, and the
checkpoint must hold the model this run builds (family, shapes, vocabulary). Each failure
raises :class:`CheckpointError` naming the file and the mismatch.

:func:`load_megatron_checkpoint` is Megatron's ``load_checkpoint`` made independent of the layer
implementation: Transformer Engine modules carry an ``_extra_state`` (FP8 scaling metadata) that
a checkpoint written with the torch-native spec, by ``convert hf-to-mcore`` or on a machine
without TE does not hold; those are left at their defaults instead of failing the load. Legacy
(``torch``) checkpoints name the norms the other implementation's way
(``input_layernorm.weight`` or TE's ``self_attention.linear_qkv.layer_norm_weight``); each is
read under the name this model uses.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import shutil
import warnings
import zipfile
from collections.abc import Iterator
from pathlib import Path

import torch
from megatron.core.dist_checkpointing.mapping import ShardedObject
from megatron.training.checkpointing import save_checkpoint
from torch.distributed.checkpoint.api import CheckpointException as DCPFailure

from megatron_patch.models.common.spec import TE_COMPATIBLE_KEYS
from megatron_patch.training.optimizer_steps import step_convention_loading
from megatron_patch.utils.files import atomic_write_text, fsync_path, fsync_tree
from megatron_patch.utils.instance_attributes import instance_attributes
from megatron_patch.utils.metadata import (
    TRACKER_FILE,
    CheckpointError,
    checkpoint_metadata,
    iteration_dir,
    read_tracker,
)

EXTRA_STATE = "_extra_state"
STAGING_DIR = ".saving"
# Megatron arguments that fix the model's parameters: a checkpoint differing in one cannot load.
ARCHITECTURE_ARGS = (
    "model_family", "num_layers", "hidden_size", "ffn_hidden_size", "num_attention_heads",
    "num_query_groups", "kv_channels", "padded_vocab_size", "swiglu", "normalization",
    "add_bias_linear", "add_qkv_bias", "qk_layernorm", "untie_embeddings_and_output_weights",
    "position_embedding_type", "num_experts", "moe_ffn_hidden_size",
    "moe_shared_expert_intermediate_size", "multi_latent_attention",
)


def _brief(error: BaseException) -> str:
    """An exception in one line: torch's checkpoint errors carry whole tracebacks."""
    lines = [line.strip() for line in str(error).splitlines() if line.strip()]
    return f"{type(error).__name__}: {lines[-1][:300] if lines else ''}"


def _rank0() -> bool:
    return torch.distributed.get_rank() == 0


def _on_rank0(action, *args) -> None:
    """Run ``action`` on rank 0; every rank raises its error (no rank waits forever)."""
    outcome = [None]
    if _rank0():
        try:
            action(*args)
        except Exception as error:  # handed to every rank below
            outcome = [f"{type(error).__name__}: {error}"]
    torch.distributed.broadcast_object_list(outcome, src=0)
    if outcome[0] is not None:
        raise CheckpointError(outcome[0])


def _fresh_staging(staging: Path) -> None:
    shutil.rmtree(staging, ignore_errors=True)  # left by a save that was killed
    staging.mkdir(parents=True)


def _publish(staging: Path, save_dir: Path, iteration: int) -> None:
    """fsync the staged checkpoint, rename it into ``save_dir``, then update the tracker."""
    staged, final = iteration_dir(staging, iteration), iteration_dir(save_dir, iteration)
    fsync_tree(staged)
    if final.exists():  # renamed by a save killed before its tracker update: never the latest
        shutil.rmtree(final)
    staged.rename(final)
    fsync_path(save_dir)
    atomic_write_text(save_dir / TRACKER_FILE, str(iteration))
    shutil.rmtree(staging)


@contextlib.contextmanager
def _logged_errors() -> Iterator[list[str]]:
    """Collect Megatron-Core's checkpointing error logs: its exceptions drop the cause (ENOSPC)."""

    class Collect(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            messages.append(record.getMessage())

    messages: list[str] = []
    handler = Collect(logging.ERROR)
    logger = logging.getLogger("megatron.core.dist_checkpointing")
    logger.addHandler(handler)
    try:
        yield messages
    finally:
        logger.removeHandler(handler)


def _free_space(directory: Path) -> str:
    try:
        return f"{shutil.disk_usage(directory).free / 2**30:.2f} GiB free on its file system"
    except OSError:
        return "free space unknown"


def save_checkpoint_atomic(state, args: argparse.Namespace) -> None:
    """Save ``state`` (a ``TrainState``) as Megatron's checkpoint of ``state.iteration``.

    Crash-safe: the tracker is updated only once the checkpoint is complete on disk. On a write
    error (e.g. a full disk) every rank raises :class:`CheckpointError`, and the previous
    checkpoint stays the latest.
    """
    save_dir, iteration = Path(args.save), state.iteration
    latest = read_tracker(save_dir)
    if latest == iteration:
        raise CheckpointError(f"{iteration_dir(save_dir, iteration)} is the latest checkpoint of "
                              f"{save_dir} and is not overwritten; save into another --save "
                              "directory")
    previous = (f"the previous checkpoint ({iteration_dir(save_dir, latest)}) is intact and still "
                "the latest" if latest is not None else f"{save_dir} holds no earlier checkpoint")
    staging = save_dir / STAGING_DIR
    _on_rank0(_fresh_staging, staging)
    args.save = str(staging)
    try:
        with _logged_errors() as logged:
            save_checkpoint(iteration, state.model, state.optimizer, state.scheduler,
                            state.flops_so_far)
    except (Exception, DCPFailure) as error:  # torch's checkpoint failure is a BaseException
        if _rank0():
            shutil.rmtree(staging, ignore_errors=True)
        cause = "; ".join(dict.fromkeys(logged)) or _brief(error)
        raise CheckpointError(f"saving the checkpoint of iteration {iteration} into {save_dir} "
                              f"failed ({cause}; {_free_space(save_dir)}); {previous}") from error
    finally:
        args.save = str(save_dir)
    try:
        _on_rank0(_publish, staging, save_dir, iteration)
    except CheckpointError as error:
        raise CheckpointError(f"publishing the checkpoint of iteration {iteration} in {save_dir} "
                              f"failed ({error}); {previous}") from error
    if _rank0():
        print(f"  checkpoint of iteration {iteration} complete: "
              f"{iteration_dir(save_dir, iteration)} ({TRACKER_FILE} updated)", flush=True)


def _read_json(file: Path) -> dict:
    try:
        return json.loads(file.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as error:
        raise CheckpointError(f"{file}: unreadable ({error}); the file is truncated or "
                              "corrupt") from None


def _check_torch_dist(directory: Path) -> argparse.Namespace | None:
    """Shard files present and long enough; returns the saved args."""
    from megatron.core import dist_checkpointing
    from torch.distributed.checkpoint import FileSystemReader

    metadata_file = directory / ".metadata"
    if not metadata_file.is_file():
        raise CheckpointError(f"{directory}: no .metadata file; the checkpoint is incomplete")
    try:
        metadata = FileSystemReader(str(directory)).read_metadata()
    except Exception as error:  # unpickling a damaged file fails in many ways
        raise CheckpointError(f"{metadata_file}: unreadable ({_brief(error)}); the file is "
                              "truncated or corrupt") from None
    ends: dict[str, int] = {}
    for info in metadata.storage_data.values():
        ends[info.relative_path] = max(ends.get(info.relative_path, 0), info.offset + info.length)
    missing = sorted(name for name in ends if not (directory / name).is_file())
    if missing:
        raise CheckpointError(f"{directory}: {len(missing)} of its {len(ends)} shard files are "
                              f"missing: {', '.join(missing[:8])}")
    for name, end in sorted(ends.items()):
        size = (directory / name).stat().st_size
        if size < end:
            raise CheckpointError(f"{directory / name}: truncated: {size} bytes, but its tensors "
                                  f"extend to byte {end}")
    try:
        common = dist_checkpointing.load_common_state_dict(str(directory))
    except (Exception, DCPFailure) as error:
        raise CheckpointError(f"{directory}: its common state (arguments, iteration) is "
                              f"unreadable ({_brief(error)}); a shard file is corrupt") from None
    return common.get("args")


def _check_legacy(directory: Path) -> argparse.Namespace | None:
    """Every ``mp_rank_*`` file present and a readable archive; returns the saved args."""
    files = sorted(directory.glob("mp_rank_*/model_optim_rng.pt"))
    if not files:
        raise CheckpointError(f"{directory}: neither a torch_dist checkpoint (metadata.json) nor "
                              "a legacy one (mp_rank_*/model_optim_rng.pt)")
    for file in files:
        if not zipfile.is_zipfile(file):
            raise CheckpointError(f"{file}: not a readable torch.save archive; the file is "
                                  "truncated or corrupt")
    saved = torch.load(files[0], map_location="cpu", mmap=True, weights_only=False).get("args")
    if saved is not None and getattr(saved, "expert_model_parallel_size", 1) == 1:
        tp, pp = saved.tensor_model_parallel_size, saved.pipeline_model_parallel_size
        expected = {directory / (f"mp_rank_{t:02d}" if pp == 1 else f"mp_rank_{t:02d}_{p:03d}")
                    / "model_optim_rng.pt" for t in range(tp) for p in range(pp)}
        missing = sorted(str(file) for file in expected - set(files))
        if missing:
            raise CheckpointError(f"{directory}: saved at TP={tp} PP={pp}, but "
                                  f"{len(missing)} shard files are missing: "
                                  f"{', '.join(missing[:8])}")
    return saved


def _architecture(args: argparse.Namespace) -> dict[str, object]:
    values = {name: getattr(args, name, None) for name in ARCHITECTURE_ARGS}
    values["model_family"] = values["model_family"] or "llama"
    if not getattr(args, "group_query_attention", False):
        values["num_query_groups"] = args.num_attention_heads
    return values


def _tokenizer_text(args: argparse.Namespace) -> str:
    kind = getattr(args, "patch_tokenizer_type", None)
    path = getattr(args, "patch_tokenizer_path", None)
    size = getattr(args, "tokenizer_vocab_size", None)
    name = " ".join(str(part) for part in (kind, path) if part) or "no tokenizer (mock data)"
    return name + (f", {size} tokens" if size else "")


def _tokenizer_mismatch(message: str, args: argparse.Namespace) -> None:
    """A different tokenizer of the same padded size: an error, a warning with --finetune."""
    if not getattr(args, "finetune", False):
        raise CheckpointError(message + " (with --finetune this is only a warning)")
    if not torch.distributed.is_initialized() or torch.distributed.get_rank() == 0:
        print(f"WARNING: {message}", flush=True)


def _check_model(saved: argparse.Namespace, args: argparse.Namespace, directory: Path) -> None:
    ours, theirs = _architecture(args), _architecture(saved)
    differ = [name for name in ARCHITECTURE_ARGS
              if ours[name] is not None and theirs[name] is not None and ours[name] != theirs[name]]
    vocab = (f"{directory}: vocabulary mismatch: the checkpoint was trained with "
             f"{_tokenizer_text(saved)} ({saved.padded_vocab_size} embedding rows); this run uses "
             f"{_tokenizer_text(args)} ({args.padded_vocab_size} rows). Use the checkpoint's "
             "tokenizer (--patch-tokenizer-type/--patch-tokenizer-path)")
    if "padded_vocab_size" in differ:
        raise CheckpointError(vocab)
    if differ:
        listed = ", ".join(f"{name}={theirs[name]!r} (this run: {ours[name]!r})"
                           for name in differ)
        raise CheckpointError(f"{directory}: holds a different model: {listed}. Pass the "
                              "checkpoint's architecture (or --hf-config-path of its model)")
    saved_tokens = getattr(saved, "tokenizer_vocab_size", None)
    run_tokens = getattr(args, "tokenizer_vocab_size", None)
    if saved_tokens and run_tokens and saved_tokens != run_tokens:
        _tokenizer_mismatch(vocab, args)


def _check_converted_tokenizer(args: argparse.Namespace) -> None:
    """A converted checkpoint records its HF tokenizer's size: this run's must match it."""
    meta = checkpoint_metadata(args.load)
    recorded = meta.get("tokenizer_vocab_size") if meta else None
    run_tokens = getattr(args, "tokenizer_vocab_size", None)
    if (recorded and run_tokens and run_tokens != recorded
            and args.patch_tokenizer_type in ("HFTokenizer", "TinyTokenizer")):
        _tokenizer_mismatch(
            f"{Path(args.load) / 'megatron_patch.json'}: the checkpoint was converted with a "
            f"tokenizer of {recorded} tokens; this run's {_tokenizer_text(args)}. Use the "
            "tokenizer files of the converted model", args)


def check_checkpoint_before_load(args: argparse.Namespace) -> Path | None:
    """Check the checkpoint ``--load`` resumes from; returns its directory (None: none yet).

    Call after ``args.padded_vocab_size`` and ``args.tokenizer_vocab_size`` are set. A
    ``--load`` without a tracker file starts from scratch, as in Megatron-LM (the save directory
    of a first run). Raises :class:`CheckpointError` for a corrupt tracker, a missing checkpoint
    directory, missing or truncated shard files, an unreadable checkpoint, or a checkpoint of a
    different model or vocabulary.
    """
    if not args.load:
        return None
    load = Path(args.load)
    latest = read_tracker(load)
    if latest is None:
        return None
    step = getattr(args, "ckpt_step", None)
    directory = iteration_dir(load, latest if step is None else step)
    if not directory.is_dir():
        named = f"--ckpt-step {step}" if step is not None else f"{load / TRACKER_FILE} names it"
        raise CheckpointError(f"{directory} does not exist ({named}); the checkpoint is missing")
    config = directory / "metadata.json"
    if config.is_file():
        backend = _read_json(config).get("sharded_backend")
        saved = _check_torch_dist(directory) if backend == "torch_dist" else None
    else:
        saved = _check_legacy(directory)
    if saved is not None:
        _check_model(saved, args, directory)
    _check_converted_tokenizer(args)
    return directory


def _saved_keys(directory: Path) -> set[str] | None:
    """The storage keys of a ``torch_dist`` checkpoint (None for another format)."""
    from torch.distributed.checkpoint import FileSystemReader

    if not (directory / ".metadata").is_file():
        return None
    return set(FileSystemReader(str(directory)).read_metadata().state_dict_metadata)


def _without_missing_extra_state(state: dict, saved: set[str]) -> dict:
    """``state`` (a sharded state dict) less the ``_extra_state`` objects ``saved`` lacks."""
    kept = {}
    for key, value in state.items():
        if isinstance(value, dict):
            value = _without_missing_extra_state(value, saved)
        elif (isinstance(value, ShardedObject) and value.key.endswith(EXTRA_STATE)
              and value.unique_key not in saved):
            continue
        kept[key] = value
    return kept


def _layout_aliases(name: str) -> list[str]:
    """The other layer implementation's names of a norm parameter (TE <-> torch-native)."""
    aliases = []
    for torch_name, te_name in TE_COMPATIBLE_KEYS.items():
        for ours, theirs in ((f".{torch_name}", f".{te_name}"), (f".{te_name}", f".{torch_name}")):
            if ours in name:
                aliases.append(name.replace(ours, theirs, 1))
    return aliases


def _completed(state: dict, expected: list[str]) -> dict:
    """``state`` with the keys ``expected`` names filled in: extra states it lacks as None (the
    module keeps its defaults), norms it holds under the other implementation's name renamed."""
    state = dict(state)
    for name in expected:
        if name in state:
            continue
        if name.endswith(EXTRA_STATE):
            state[name] = None
            continue
        alias = next((a for a in _layout_aliases(name) if a in state), None)
        if alias is not None:
            state[name] = state.pop(alias)
    return state


def _filtering(build, saved: set[str] | None):
    """``sharded_state_dict`` that leaves out the extra states ``saved`` lacks."""
    def sharded_state_dict(*args, **kwargs):
        state = build(*args, **kwargs)
        return state if saved is None else _without_missing_extra_state(state, saved)

    return sharded_state_dict


def _completing(load, module: torch.nn.Module):
    """``load_state_dict`` that first completes the state dict for ``module``."""
    def load_state_dict(state_dict, *args, **kwargs):
        expected = list(module.state_dict(keep_vars=True))
        return load(_completed(state_dict, expected), *args, **kwargs)

    return load_state_dict


def layout_independent_loading(chunks: list[torch.nn.Module], directory: Path | None
                               ) -> contextlib.AbstractContextManager[None]:
    """While active, ``chunks`` load checkpoints of either layer implementation (see module)."""
    from megatron.core.utils import unwrap_model

    saved = _saved_keys(directory) if directory is not None else None
    # Megatron builds the sharded state dict from the unwrapped model, loads into the wrapper.
    patched = [(inner, "sharded_state_dict", _filtering(inner.sharded_state_dict, saved))
               for inner in unwrap_model(chunks)]
    patched += [(chunk, "load_state_dict", _completing(chunk.load_state_dict, chunk))
                for chunk in chunks]
    # an instance's own earlier replacement (e.g. adapters-only LoRA checkpoints) stays after
    return instance_attributes(patched)


# torch.distributed.checkpoint's notices on every load: meant for library authors, not users.
_TORCH_LOAD_NOTICES = (r"torch\.distributed is disabled", r"The argument order of load",
                       r"Please use DTensor instead")


def _finetune_load_message(message: object) -> str | None:
    """Megatron's load message as read under ``--finetune`` (None: not worth printing).

    With ``--finetune`` Megatron deliberately ignores the saved arguments and iteration (only
    the weights are taken), yet says it found no arguments and loaded "at iteration 0".
    """
    text = str(message)
    if text.startswith("could not find arguments in the checkpoint"):
        return None
    if "successfully loaded checkpoint" in text and text.endswith("at iteration 0"):
        return text.removesuffix("at iteration 0") + ("(its weights only; the iteration count "
                                                      "starts again at 0)")
    return text


def schedule_mismatch_message(error: AssertionError, load_dir: str | None) -> str:
    """Megatron's learning-rate schedule check, worded with the two ways on."""
    detail = str(error).removeprefix("OptimizerParamScheduler:").strip()
    return (f"error: --load {load_dir}: the checkpoint's learning-rate schedule differs from "
            f"this run's ({detail}). Add --override-opt_param-scheduler to train on with this "
            "run's schedule (e.g. after raising --train-iters), or "
            "--use-checkpoint-opt_param-scheduler to keep the checkpoint's")


def load_megatron_checkpoint(model: list[torch.nn.Module], optimizer, scheduler,
                             load_arg: str = "load", strict: bool = True) -> tuple[int, float]:
    """Megatron's ``load_checkpoint`` of ``args.<load_arg>`` into ``model``; returns (iteration,
    flops).

    Whichever layer implementation (Transformer Engine or torch-native) and Adam (fused or
    torch's) wrote the checkpoint,
    without torch's notices to library authors, and with Megatron's messages reworded for
    ``--finetune`` loads.
    """
    from megatron.training import checkpointing
    from megatron.training.global_vars import get_args

    args = get_args()
    load_dir = getattr(args, load_arg, None)
    directory = None
    latest = read_tracker(load_dir) if load_dir else None
    if latest is not None:
        step = getattr(args, "ckpt_step", None)
        directory = iteration_dir(load_dir, latest if step is None else step)
    original = checkpointing.print_rank_0

    def reworded(message, *args, **print_kwargs):
        text = _finetune_load_message(message)
        if text is not None:
            original(text, *args, **print_kwargs)

    # no_grad: the distributed optimizer copies loaded values into fp32 main parameters that
    # are views of the model's own (fp32 training), which autograd refuses outside it
    with (warnings.catch_warnings(), layout_independent_loading(model, directory),
          step_convention_loading(optimizer), torch.no_grad()):
        for notice in _TORCH_LOAD_NOTICES:
            warnings.filterwarnings("ignore", message=notice)
        if args.finetune:
            checkpointing.print_rank_0 = reworded
        try:
            return checkpointing.load_checkpoint(model, optimizer, scheduler, load_arg=load_arg,
                                                 strict=strict)
        except AssertionError as error:
            if str(error).startswith("OptimizerParamScheduler:"):
                raise SystemExit(schedule_mismatch_message(error, load_dir)) from None
            raise
        finally:
            checkpointing.print_rank_0 = original
