"""Training-step speed of a vision-language model (LLaVA) through megatron-patch's training step.

A randomly initialised LLaVA-shaped model (CLIP ViT tower, MLP projector, Llama language
model; shapes below, nothing downloaded) trains on random images and text through the real
training step (Megatron-Core's schedule, DDP and optimizer; the vision tower runs in every step,
not frozen). Prints the median step time over ``--iters`` steps after warm-up, tokens/s as
(language tokens + vision patches) per second and each part alone, and the peak GPU memory.

    python -m toolkits.benchmark.bench_vlm [--shape small] [--mbs 4] [--seq 1024] [--iters 10]
    python -m toolkits.benchmark.bench_vlm --tiny        # CPU smoke run (fp32, seconds)

On a GPU the run uses bf16. One process, TP=PP=1. Arguments after ``--`` go to Megatron (e.g.
``-- --no-torch-compile-layers --recompute-activations``).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import tempfile
import time
from pathlib import Path

import torch

# name -> (vision: layers, hidden, ffn, heads, image size, patch;
#          text: layers, hidden, ffn, heads, kv heads, vocab)
SHAPES = {
    "small": ((24, 1024, 4096, 16, 336, 14), (16, 2048, 8192, 16, 8, 32064)),  # ViT-L + 1.1B
    "tiny": ((2, 64, 128, 4, 28, 7), (2, 128, 256, 4, 2, 512)),
}


def llava_config(shape: str) -> dict:
    """An HF LLaVA ``config.json`` of ``shape`` (image token: the last vocabulary id)."""
    (vl, vh, vf, vn, size, patch), (tl, th, tf, tn, tk, vocab) = SHAPES[shape]
    return {
        "architectures": ["LlavaForConditionalGeneration"], "model_type": "llava",
        "image_token_id": vocab - 1, "vision_feature_layer": -2,
        "vision_feature_select_strategy": "default", "projector_hidden_act": "gelu",
        "vision_config": {"model_type": "clip_vision_model", "hidden_size": vh,
                          "intermediate_size": vf, "num_hidden_layers": vl,
                          "num_attention_heads": vn, "image_size": size, "patch_size": patch,
                          "hidden_act": "quick_gelu", "layer_norm_eps": 1e-5},
        "text_config": {"model_type": "llama", "hidden_size": th, "intermediate_size": tf,
                        "num_hidden_layers": tl, "num_attention_heads": tn,
                        "num_key_value_heads": tk, "vocab_size": vocab,
                        "max_position_embeddings": 8192, "rms_norm_eps": 1e-5,
                        "tie_word_embeddings": False},
    }


def _batches(config: dict, mbs: int, seq: int, image_tokens: int, device: torch.device):
    """Endless micro-batches: one image per sample, its token first, random text after."""
    vocab, size = config["text_config"]["vocab_size"], config["vision_config"]["image_size"]
    text = seq - image_tokens + 1
    tokens = torch.randint(0, vocab - 1, (mbs, text), device=device)
    tokens[:, 0] = config["image_token_id"]
    batch = {"tokens": tokens, "labels": torch.roll(tokens, -1, 1),
             "loss_mask": torch.ones(mbs, text, device=device),
             "images": torch.randn(mbs, 1, 3, size, size, device=device),
             "num_images": torch.ones(mbs, dtype=torch.long, device=device)}
    while True:
        yield batch


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--shape", choices=sorted(SHAPES), default="small")
    parser.add_argument("--mbs", type=int, default=4)
    parser.add_argument("--seq", type=int, default=1024, help="language-model sequence length")
    parser.add_argument("--iters", type=int, default=10)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--tiny", action="store_true", help="CPU smoke run of the tiny shape")
    parser.add_argument("megatron", nargs="*", help="extra Megatron flags (after --)")
    args = parser.parse_args(argv)
    if args.tiny:
        args.shape, args.mbs, args.seq, args.iters, args.warmup = "tiny", 2, 64, 3, 1
    os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
    os.environ.setdefault("MASTER_PORT", "29533")
    for key, value in (("WORLD_SIZE", "1"), ("RANK", "0"), ("LOCAL_RANK", "0")):
        os.environ.setdefault(key, value)

    from megatron_patch.arguments import parse_training_args
    from megatron_patch.models.llava import image_tokens
    from megatron_patch.training import loop
    from megatron_patch.training.initialize import initialize
    from megatron_patch.training.pretrain import set_padded_vocab
    from megatron_patch.training.vlm import vlm_forward_step

    cuda = torch.cuda.is_available()
    config = llava_config(args.shape)
    per_image = image_tokens(config)
    with tempfile.TemporaryDirectory() as hf_dir:
        (Path(hf_dir) / "config.json").write_text(json.dumps(config))
        megatron = parse_training_args([
            "--hf-config-path", hf_dir, "--micro-batch-size", str(args.mbs),
            "--global-batch-size", str(args.mbs), "--seq-length", str(args.seq),
            "--lr", "1e-5", "--train-iters", "1000", "--clip-grad", "1.0",
            "--attention-dropout", "0", "--hidden-dropout", "0", "--dataset", "mock",
            *(["--bf16", "--use-distributed-optimizer"] if cuda else []), *args.megatron])
        initialize(megatron)
        set_padded_vocab(megatron, None)
        state = loop.setup_model_and_optimizer(megatron)
    loop._configure_model_hooks(state)
    device = torch.device("cuda" if cuda else "cpu")
    batches = _batches(config, args.mbs, args.seq, per_image, device)
    times = []
    for step in range(args.warmup + args.iters):
        if cuda:
            torch.cuda.synchronize()
        start = time.perf_counter()
        loop.train_step(state, [batches], vlm_forward_step, megatron)
        if cuda:
            torch.cuda.synchronize()
        if step >= args.warmup:
            times.append(time.perf_counter() - start)
    seconds = statistics.median(times)
    (vl, vh, *_), _ = SHAPES[args.shape]
    patches = args.mbs * (per_image + 1)  # the tower also sees the class token
    result = {
        "device": torch.cuda.get_device_name() if cuda else "cpu", "shape": args.shape,
        "mbs": args.mbs, "seq": args.seq, "step_ms": round(seconds * 1e3, 1),
        "tokens_per_s": round((args.mbs * args.seq + patches) / seconds, 1),
        "text_tokens_per_s": round(args.mbs * args.seq / seconds, 1),
        "vision_patches_per_s": round(patches / seconds, 1),
        "parameters": sum(p.numel() for p in state.model[0].parameters()),
        "peak_memory_gib": round(torch.cuda.max_memory_allocated() / 2**30, 2) if cuda else None,
    }
    print(json.dumps(result))
    return result


if __name__ == "__main__":
    main()
