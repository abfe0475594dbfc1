"""Reward-model checkpoint -> Hugging Face ``*ForSequenceClassification`` (``num_labels=1``).

The backbone goes through the family's declarative conversion (:func:`convert_mcore_to_hf`); the
value head becomes ``score.weight`` and the language-model head is dropped. The padding id is
the tokenizer's, which transformers uses to find each row's last token (as training did).

``python -m rlhf.export --mcore-dir RUN --out DIR [--hf-template HF_DIR] [--dtype fp32]``
"""

from __future__ import annotations

import argparse
import json
import tempfile
from collections.abc import Sequence
from pathlib import Path

import torch
from megatron.core import dist_checkpointing
from megatron.core.dist_checkpointing import ShardedTensor

from megatron_patch.conversion.hf_io import HFCheckpoint, ShardedSafetensorsWriter, parse_size
from megatron_patch.conversion.layout import single_process_group
from megatron_patch.conversion.mcore_to_hf import checkpoint_directory, convert_mcore_to_hf
from megatron_patch.utils.files import atomic_directory, copy_model_files
from rlhf.reward_model import VALUE_HEAD

SCORE = "score.weight"
_LM_HEADS = ("lm_head.weight", "output.weight", "embed_out.weight")


def classification_architecture(causal: str) -> str:
    """``LlamaForCausalLM`` -> ``LlamaForSequenceClassification``, if transformers has it."""
    import transformers

    name = causal.replace("ForCausalLM", "ForSequenceClassification")
    if name == causal or not hasattr(transformers, name):
        raise ValueError(f"transformers has no sequence-classification model for {causal!r}; "
                         "reward-model export supports families with one (llama, qwen2, qwen3, "
                         "mistral, ...)")
    return name


def read_value_head(directory: Path) -> torch.Tensor:
    """``value_head.weight`` [1, hidden] of a ``torch_dist`` reward-model checkpoint."""
    key = f"{VALUE_HEAD}.weight"
    if not dist_checkpointing.check_is_distributed_checkpoint(str(directory)):
        raise ValueError(f"{directory}: reward-model export reads torch_dist checkpoints only")
    metadata = dist_checkpointing.load_tensors_metadata(str(directory))
    if key not in metadata:
        raise ValueError(f"{directory}: no {key!r}; not a checkpoint of rlhf.reward_model")
    meta = metadata[key]
    request = {key: ShardedTensor.from_rank_offsets(
        key, torch.empty(tuple(meta.global_shape), dtype=meta.dtype))}
    return dist_checkpointing.load(request, str(directory), validate_access_integrity=False)[key]


def export_reward_model(mcore_dir: str | Path, out: str | Path, *,
                        hf_template: str | Path | None = None, dtype: str | None = None,
                        pad_token_id: int | None = None,
                        max_shard_size: int | str = "5GB") -> Path:
    """Write the reward model in ``mcore_dir`` as an HF sequence-classification model at ``out``.

    ``pad_token_id`` defaults to the template's/checkpoint's config, else the saved tokenizer's
    padding id.
    """
    mcore_dir = Path(mcore_dir)
    directory = checkpoint_directory(mcore_dir)
    with (tempfile.TemporaryDirectory() as causal_dir, atomic_directory(out) as scratch,
          single_process_group(scratch)):
        head = read_value_head(directory)
        causal = convert_mcore_to_hf(mcore_dir, Path(causal_dir) / "hf", hf_template=hf_template,
                                     dtype=dtype, progress=False)
        config = json.loads((causal / "config.json").read_text())
        reader = HFCheckpoint(causal)
        out_dtype = reader.dtype(reader.names[0])
        writer = ShardedSafetensorsWriter(scratch, parse_size(max_shard_size))
        for name in reader.names:
            if name not in _LM_HEADS:
                writer.add(name, reader.get(name))
        writer.add(SCORE, head.to(out_dtype))
        writer.finish()
        if pad_token_id is None:
            pad_token_id = config.get("pad_token_id")
        if pad_token_id is None:
            pad_token_id = _saved_tokenizer_pad(directory)
        config.update(architectures=[classification_architecture(config["architectures"][0])],
                      num_labels=1, id2label={"0": "LABEL_0"}, label2id={"LABEL_0": 0},
                      pad_token_id=pad_token_id)
        (scratch / "config.json").write_text(json.dumps(config, indent=2) + "\n")
        copy_model_files(causal, scratch)
    return Path(out)


def _saved_tokenizer_pad(directory: Path) -> int | None:
    from megatron_patch.conversion.mcore_to_hf import open_checkpoint
    from megatron_patch.training.pretrain import build_run_tokenizer

    args = open_checkpoint(directory).args
    if getattr(args, "patch_tokenizer_type", None) is None:
        return None
    return int(build_run_tokenizer(args).pad)


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m rlhf.export``; returns the exit status."""
    parser = argparse.ArgumentParser(prog="rlhf.export", description=__doc__.splitlines()[0])
    parser.add_argument("--mcore-dir", required=True, help="reward-model run or checkpoint")
    parser.add_argument("--out", required=True, help="HF model directory to write")
    parser.add_argument("--hf-template", default=None,
                        help="HF directory giving config.json and tokenizer files")
    parser.add_argument("--dtype", default=None, help="fp32, bf16 or fp16")
    options = parser.parse_args(argv)
    export_reward_model(options.mcore_dir, options.out, hf_template=options.hf_template,
                        dtype=options.dtype)
    print(f"wrote {options.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
