"""Training-step speed of a vision-language model through megatron-patch's training step.

A randomly initialised model of ``--family`` (shapes below, nothing downloaded) trains on random
images and text through the real training step (Megatron-Core's schedule, DDP and optimizer;
the vision tower runs in every step, not frozen):

- ``llava`` ``small``: a CLIP ViT-L/336 tower, MLP projector, 1.1B Llama; one 336x336 image
  per sample (576 patches + class token).
- ``qwen2_5_vl`` ``small``: Qwen2.5-VL-3B's vision tower (32 layers of 1280, windowed
  attention but in layers 7/15/23/31, patch merger) and 12 of its 36 language layers (2048,
  GQA 16/2, M-RoPE, vocabulary 151936), 1.9B parameters; one ``--image-size`` square image per
  sample (448: 32x32 patches, 256 of the ``--seq`` tokens).

Prints the median step time over ``--iters`` steps after warm-up, tokens/s as (language-model
tokens, image positions included + vision patches) per second and each part alone, and the
peak GPU memory.

    python -m toolkits.benchmark.bench_vlm [--family llava] [--shape small] [--mbs 4] [--seq 1024]
    python -m toolkits.benchmark.bench_vlm --family qwen2_5_vl [--image-size 448] ...
    python -m toolkits.benchmark.bench_vlm --tiny [--family ...]  # CPU smoke run (fp32, seconds)

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


# name -> (vision: layers, hidden, ffn, heads, patch, window, full-attention layers;
#          text: layers, hidden, ffn, heads, kv heads, vocab, M-RoPE sections)
QWEN2_5_VL_SHAPES = {
    "small": ((32, 1280, 3420, 16, 14, 112, [7, 15, 23, 31]),
              (12, 2048, 11008, 16, 2, 151936, [16, 24, 24])),
    "tiny": ((2, 64, 128, 4, 4, 16, [1]), (2, 128, 256, 4, 2, 512, [4, 6, 6])),
}


def qwen2_5_vl_config(shape: str) -> dict:
    """An HF Qwen2.5-VL ``config.json`` of ``shape`` (vision token ids: the last four ids)."""
    (vl, vh, vf, vn, patch, window, full), (tl, th, tf, tn, tk, vocab, mrope) = \
        QWEN2_5_VL_SHAPES[shape]
    return {
        "architectures": ["Qwen2_5_VLForConditionalGeneration"], "model_type": "qwen2_5_vl",
        "vision_start_token_id": vocab - 4, "image_token_id": vocab - 3,
        "vision_end_token_id": vocab - 2, "video_token_id": vocab - 1,
        "tie_word_embeddings": False,
        "vision_config": {"model_type": "qwen2_5_vl_vision", "depth": vl, "hidden_size": vh,
                          "intermediate_size": vf, "num_heads": vn, "patch_size": patch,
                          "temporal_patch_size": 2, "spatial_merge_size": 2,
                          "window_size": window, "fullatt_block_indexes": full,
                          "out_hidden_size": th, "hidden_act": "silu"},
        "text_config": {"model_type": "qwen2_5_vl_text", "hidden_size": th,
                        "intermediate_size": tf, "num_hidden_layers": tl,
                        "num_attention_heads": tn, "num_key_value_heads": tk,
                        "vocab_size": vocab, "max_position_embeddings": 32768,
                        "rms_norm_eps": 1e-6, "tie_word_embeddings": False,
                        "rope_parameters": {"rope_type": "default", "rope_theta": 1e6,
                                            "mrope_section": mrope}},
    }


def _qwen2_5_vl_batches(config: dict, mbs: int, seq: int, image_size: int,
                        device: torch.device):
    """Endless micro-batches: per sample one ``image_size`` square image's span first, random
    text after; returns (batches, vision patches per micro-batch)."""
    from megatron_patch.models.qwen2_vl.rope_index import rope_index

    vision, vocab = config["vision_config"], config["text_config"]["vocab_size"]
    patch, merge = vision["patch_size"], vision["spatial_merge_size"]
    side = image_size // (patch * merge) * merge
    span = side * side // merge ** 2
    if span + 2 > seq:
        raise ValueError(f"--seq {seq} cannot hold an image of {span} tokens")
    tokens = torch.randint(0, vocab - 4, (mbs, seq))
    tokens[:, 0], tokens[:, span + 1] = config["vision_start_token_id"], \
        config["vision_end_token_id"]
    tokens[:, 1:span + 1] = config["image_token_id"]
    grids = torch.tensor([[1, side, side]] * mbs)
    positions = rope_index(tokens, grids, config["image_token_id"], merge)
    patch_dim = 3 * vision["temporal_patch_size"] * patch * patch
    batch = {"tokens": tokens, "labels": torch.roll(tokens, -1, 1),
             "loss_mask": torch.ones(mbs, seq), "position_ids": positions,
             "pixel_values": torch.randn(mbs * side * side, patch_dim),
             "image_grid_thw": grids}
    batch = {key: value.to(device) for key, value in batch.items()}

    def forever():
        while True:
            yield batch
    return forever(), mbs * side * side


def _llava_batches(config: dict, mbs: int, seq: int, image_size: int, device: torch.device):
    """Endless micro-batches and the vision patches of one (the tower also sees the class
    token); the image size is the tower's."""
    from megatron_patch.models.llava import image_tokens

    per_image = image_tokens(config)
    return _batches(config, mbs, seq, per_image, device), mbs * (per_image + 1)


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
    parser.add_argument("--family", choices=sorted(FAMILIES), default="llava")
    parser.add_argument("--shape", choices=sorted(SHAPES), default="small")
    parser.add_argument("--image-size", type=int, default=448,
                        help="qwen2_5_vl: side of each sample's square image in pixels (448: "
                             "32x32 patches, 256 language-model tokens)")
    parser.add_argument("--mbs", type=int, default=4)
    parser.add_argument("--seq", type=int, default=1024, help="language-model sequence length")
    parser.add_argument("--iters", type=int, default=10)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--tiny", action="store_true", help="CPU smoke run of the tiny shape")
    parser.add_argument("megatron", nargs="*", help="extra Megatron flags (after --)")
    args = parser.parse_args(argv)
    if args.tiny:
        args.shape, args.mbs, args.seq, args.iters, args.warmup = "tiny", 2, 64, 3, 1
        args.image_size = 32
    os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
    os.environ.setdefault("MASTER_PORT", "29533")
    for key, value in (("WORLD_SIZE", "1"), ("RANK", "0"), ("LOCAL_RANK", "0")):
        os.environ.setdefault(key, value)

    from megatron_patch.arguments import parse_training_args
    from megatron_patch.models.registry import get_family
    from megatron_patch.training import loop
    from megatron_patch.training.initialize import initialize
    from megatron_patch.training.pretrain import set_padded_vocab
    from megatron_patch.training.vlm import forward_step_for

    cuda = torch.cuda.is_available()
    make_config, make_batches, family = FAMILIES[args.family]
    config = make_config(args.shape)
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
    batches, patches = make_batches(config, args.mbs, args.seq, args.image_size, device)
    forward_step = forward_step_for(get_family(family))
    times = []
    for step in range(args.warmup + args.iters):
        if cuda:
            torch.cuda.synchronize()
        start = time.perf_counter()
        loop.train_step(state, [batches], forward_step, megatron)
        if cuda:
            torch.cuda.synchronize()
        if step >= args.warmup:
            times.append(time.perf_counter() - start)
    seconds = statistics.median(times)
    result = {
        "device": torch.cuda.get_device_name() if cuda else "cpu", "family": args.family,
        "shape": args.shape,
        "mbs": args.mbs, "seq": args.seq, "step_ms": round(seconds * 1e3, 1),
        "tokens_per_s": round((args.mbs * args.seq + patches) / seconds, 1),
        "text_tokens_per_s": round(args.mbs * args.seq / seconds, 1),
        "vision_patches_per_s": round(patches / seconds, 1),
        "parameters": sum(p.numel() for p in state.model[0].parameters()),
        "peak_memory_gib": round(torch.cuda.max_memory_allocated() / 2**30, 2) if cuda else None,
    }
    print(json.dumps(result))
    return result


# --family -> (config.json of a shape, micro-batches, registered family)
FAMILIES = {"llava": (llava_config, _llava_batches, "llava"),
            "qwen2_5_vl": (qwen2_5_vl_config, _qwen2_5_vl_batches, "qwen2_vl")}


if __name__ == "__main__":
    main()
