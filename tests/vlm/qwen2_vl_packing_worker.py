"""torchrun worker (one rank): packed Qwen2-VL rows against the same samples unpacked.

``python -m torch.distributed.run --nproc-per-node 1 -m tests.vlm.qwen2_vl_packing_worker HF
MCORE OUT`` runs the training forward step on two packed rows (a micro-batch of 2, flattened as
training runs it) and on their samples one per row, and writes the max |difference| of the
per-token losses over every sample's tokens (``"packed"``), and the same for the packed rows
with attention across documents (``"cross"``: it must differ, or the check proves nothing).
"""

import json
import sys
from pathlib import Path

import torch

from megatron_patch.conversion.layout import parse_megatron_args
from megatron_patch.conversion.verify.vlm import build_vlm_model
from megatron_patch.models.common.hf_config import load_hf_config
from megatron_patch.models.registry import get_family
from megatron_patch.tokenizer import TinyTokenizer
from megatron_patch.training import vlm
from megatron_patch.training.initialize import initialize, teardown_parallel_state
from megatron_patch.training.pretrain import set_padded_vocab
from tests.vlm.test_multimodal_data import ASSETS

SEQ = 160


def main(hf_dir: str, mcore_dir: str, out: str) -> None:
    args = parse_megatron_args([
        "--load", mcore_dir, "--hf-config-path", hf_dir, "--micro-batch-size", "2",
        "--global-batch-size", "2", "--seq-length", str(SEQ), "--finetune", "--no-load-optim",
        "--no-load-rng", "--attention-dropout", "0", "--hidden-dropout", "0"])
    initialize(args)
    try:
        set_padded_vocab(args, None)
        (model,) = build_vlm_model(args)
        model.eval()
        tokenizer, hf = TinyTokenizer(), load_hf_config(hf_dir)
        data = ASSETS / "tiny_vlm_chat.jsonl"
        args.sft_packing = False
        family = get_family("qwen2_vl")
        plain = vlm.sft_dataset(args, tokenizer, hf, family)(data)
        args.sft_packing = True
        packed = vlm.sft_dataset(args, tokenizer, hf, family)(data)
        rows = [r for r in range(len(packed)) if len(packed.rows[r]) > 1][:2]
        samples = [k for r in rows for k in packed.rows[r]]
        batch = packed.collate([packed[r] for r in rows])
        with torch.no_grad():
            forward_step = vlm.forward_step_for(family)
            together, _ = forward_step(iter([batch]), model)
            alone, _ = forward_step(
                iter([plain.collate([plain[k] for k in samples])]), model)
            images = batch["image_grid_thw"]
            crossing = model(input_ids=batch["tokens"].reshape(1, -1),
                             position_ids=batch["position_ids"].reshape(3, 1, -1),
                             pixel_values=batch["pixel_values"], image_grid_thw=images,
                             labels=batch["labels"].reshape(1, -1))
        diffs = {"packed": 0.0, "cross": 0.0}
        index = 0
        for slot, r in enumerate(rows):
            bounds = batch["cu_seqlens"][slot].tolist()
            for start, end in zip(bounds, bounds[1:len(packed.rows[r]) + 1]):
                span = slice(slot * SEQ + start, slot * SEQ + end)
                for key, output in (("packed", together), ("cross", crossing)):
                    diff = (output[0, span] - alone[index, :end - start]).abs().max().item()
                    diffs[key] = max(diffs[key], diff)
                index += 1
        Path(out).write_text(json.dumps({**diffs, "samples": len(samples)}))
    finally:
        teardown_parallel_state()


if __name__ == "__main__":
    main(*sys.argv[1:4])
