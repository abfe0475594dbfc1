"""The memory model against analytic numbers and built Megatron models; ``megatron-patch plan``."""

import json
from pathlib import Path

import pytest
import torch

from megatron_patch.launch.memory import (
    GIB,
    Layout,
    Shape,
    activation_bytes,
    estimate,
    layer_activation_bytes,
    stage_params,
    state_bytes,
    total_params,
)
from megatron_patch.launch.model_sizes import find_model
from megatron_patch.launch.plan import main as plan_main
from megatron_patch.models.registry import get_family

# Korthikanti et al.'s GPT layer: 4h GeLU MLP, multi-head attention, dropout, no flash attention.
H, A, S, B = 1024, 16, 2048, 2
GPT = Shape(layers=8, hidden=H, ffn=4 * H, heads=A, groups=A, head_dim=H // A, vocab=50257,
            gated=False, attention_dropout=0.1, hidden_dropout=0.1)


def _layer(**layout) -> float:
    return layer_activation_bytes(GPT, Layout(seq=S, micro_batch=B, flash_attention=False,
                                              **layout))


@pytest.mark.parametrize("t", [1, 2, 4, 8])
def test_activations_match_korthikanti_formulas(t):
    sbh, score = S * B * H, 5 * A * S / H
    assert _layer(tp=t) == pytest.approx(sbh * (10 + 24 / t + score / t))  # eq. 2 (t=1: eq. 1)
    assert _layer(tp=t, sp=t > 1) == pytest.approx(sbh / t * (34 + score))  # eq. 4
    assert _layer(tp=t, sp=t > 1, recompute="sel") == pytest.approx(sbh / t * 34)  # eq. 6
    # Flash attention never stores the scores, like selective recompute.
    assert layer_activation_bytes(GPT, Layout(seq=S, micro_batch=B, tp=t, sp=t > 1)) \
        == pytest.approx(sbh / t * 34)


def test_pipeline_and_full_recompute_activations():
    sbh, per_layer = S * B * H, S * B * H * 34
    one = dict(seq=S, micro_batch=B, global_batch=64)
    # 1F1B: the first stage holds PP micro-batches of L/PP layers = L layers' worth.
    assert activation_bytes(GPT, Layout(pp=4, **one), 0) == pytest.approx(8 * per_layer)
    assert activation_bytes(GPT, Layout(pp=4, **one), 3) == pytest.approx(2 * per_layer)
    # Interleaved: L * (1 + (PP-1)/(PP*VPP)) layers' worth.
    assert activation_bytes(GPT, Layout(pp=4, vpp=2, **one), 0) == pytest.approx(
        8 * per_layer * (1 + 3 / 8))
    # Fewer micro-batches (2) than stages: only those are in flight, of 2 layers each.
    assert activation_bytes(GPT, Layout(pp=4, seq=S, micro_batch=B, global_batch=4), 0) \
        == pytest.approx(2 * 2 * per_layer)
    # Full recompute: every layer's input (2sbh), plus one layer's working set.
    assert activation_bytes(GPT, Layout(recompute="full", **one), 0) == pytest.approx(
        8 * 2 * sbh + per_layer)
    # Context parallelism divides the sequence.
    assert activation_bytes(GPT, Layout(cp=2, **one), 0) == pytest.approx(8 * per_layer / 2)


def test_weight_gradient_and_optimizer_bytes():
    model = Shape(layers=4, hidden=512, ffn=2048, heads=8, groups=8, head_dim=64, vocab=32000)
    params = stage_params(model, Layout(), 0)
    assert sum(state_bytes(params, Layout())) == 18 * params.total  # bf16 mixed-precision Adam
    assert sum(state_bytes(params, Layout(precision="fp32"))) == 16 * params.total
    sharded = state_bytes(params, Layout(dp=8, distributed_optimizer=True))
    assert sum(sharded) == pytest.approx((6 + 12 / 8) * params.total)
    offloaded = state_bytes(params, Layout(dp=8, distributed_optimizer=True,
                                           offload_fraction=1.0))
    assert offloaded[2] == 0 and sum(offloaded) == 6 * params.total


def test_parameters_are_split_like_megatron():
    model = Shape(layers=8, hidden=512, ffn=1536, heads=8, groups=4, head_dim=64, vocab=32768)
    total = total_params(model)
    stages = [stage_params(model, Layout(pp=4), s).total for s in range(4)]
    assert sum(stages) == total
    tied = Shape(**{**model.__dict__, "tied": True})
    vocab = tied.padded_vocab(1) * 512
    assert sum(stage_params(tied, Layout(pp=2), s).total for s in range(2)) \
        == total_params(tied) + vocab  # the last stage keeps a copy of tied embeddings
    norms = 8 * 2 * 512 + 512  # replicated on every TP rank
    tp4 = stage_params(model, Layout(tp=4), 0).total
    assert tp4 == (total - norms) // 4 + norms
    # The vocabulary is padded to a multiple of 128 * TP, as Megatron pads it.
    assert Shape(**{**model.__dict__, "vocab": 32000}).padded_vocab(4) == 32256


def _published(name: str) -> int:
    family, model = find_model(name)
    return total_params(Shape.from_megatron_args(get_family(family).hf_to_megatron(
        model.hf_config)))


def test_parameter_counts_of_published_models():
    assert _published("llama3.1-8b") == 8_030_261_248
    assert _published("qwen2.5-7b") == 7_615_616_512
    assert _published("qwen2.5-0.5b") == 494_032_768
    assert _published("qwen3-8b") == 8_190_735_360


def _tiny_models() -> list[tuple[str, list[str], dict]]:
    from megatron_patch.launch.model_sizes import family_sizes
    from megatron_patch.models.registry import registered_families

    return [(m.name, [], {}) for f in registered_families() for m in family_sizes(f)
            if m.size == "tiny"]


BUILDS = [  # (model, extra Megatron flags, config.json changes)
    *_tiny_models(), ("qwen2.5-0.5b", [], {}), ("llama3.1-8b", [], {}), ("falcon-7b", [], {}),
    ("glm-tiny", [], {"architectures": ["Glm4ForCausalLM"]}),  # post-sublayer norms
    ("llama-tiny", ["--num-experts", "4", "--moe-ffn-hidden-size", "96"], {}),
    ("llama-tiny", ["--num-experts", "4", "--moe-ffn-hidden-size", "96",
                    "--moe-shared-expert-intermediate-size", "160", "--moe-shared-expert-gate"],
     {}),
]


def test_parameter_counts_match_built_megatron_models(tmp_path):
    """Megatron-Core models built (on the meta device) from the same configs."""
    from megatron_patch.conversion.layout import (
        build_layout,
        parse_megatron_args,
        single_process_group,
    )
    from megatron_patch.models.vocab import padded_vocab_size

    with single_process_group(tmp_path):
        for index, (name, extra, changes) in enumerate(BUILDS):
            _, model = find_model(name)
            directory = tmp_path / str(index)
            directory.mkdir()
            (directory / "config.json").write_text(json.dumps({**model.hf_config, **changes}))
            args = parse_megatron_args(["--hf-config-path", str(directory),
                                        "--micro-batch-size", "1", "--seq-length", "64", *extra])
            args.padded_vocab_size = padded_vocab_size(args.vocab_size, 128, 1)
            built = build_layout(args, get_family(args.model_family), torch.bfloat16).model
            measured = sum(p.numel() for p in built.parameters())
            assert total_params(Shape.from_megatron_args(vars(args))) == measured, (name, extra)


def test_plan_proposes_a_fitting_layout(capsys):
    assert plan_main(["--model", "qwen2.5-7b", "--gpus", "8", "--seq", "4096"]) == 0
    out = capsys.readouterr().out
    proposed = out.split("proposed: ")[1].splitlines()[0]
    total = float(out.split("estimated memory per GPU: ")[1].split(" GiB")[0])
    assert total <= 80 and "TP=" in proposed and "MBS=" in proposed
    assert "launch: bash examples/qwen2/run_mcore_qwen2.sh --model-size 7B" in out
    # Llama-3.1-70B needs model parallelism on 80 GiB GPUs; 8B cannot fit one GPU at 8192.
    assert plan_main(["--model", "llama3.1-70b", "--gpus", "16", "--seq", "8192"]) == 0
    assert "DP=16" not in capsys.readouterr().out.split("proposed: ")[1].splitlines()[0]
    assert plan_main(["--model", "llama3.1-8b", "--gpus", "1", "--seq", "8192"]) == 1
    assert "no layout fits 80 GiB" in capsys.readouterr().err


def test_plan_honours_pins_and_reads_hf_directories(tmp_path, capsys):
    family, model = find_model("qwen3-0.6b")
    (tmp_path / "config.json").write_text(json.dumps(model.hf_config))
    assert plan_main(["--hf-config-path", str(tmp_path), "--gpus", "4", "--seq", "2048",
                      "--tp", "2", "--recompute", "full", "--gpu-mem", "24"]) == 0
    proposed = capsys.readouterr().out.split("proposed: ")[1].splitlines()[0]
    assert "TP=2 " in proposed and "recompute=full" in proposed
    # A pinned EP (or TP) narrows the search: every listed layout honours it and stays valid
    # (EP within the GPUs of one pipeline stage; sequence parallelism only with TP > 1).
    assert plan_main(["--model", "qwen3-30b-a3b", "--gpus", "8", "--seq", "4096", "--ep", "8",
                      "--tp", "1", "--gpu-mem", "141", "--top", "20"]) == 0
    layouts = [line for line in capsys.readouterr().out.splitlines() if "EP=" in line]
    assert layouts and all("EP=8 " in line and "TP=1 " in line and "PP=1 " in line
                           and "SP=false" in line for line in layouts)


def test_multi_query_models_are_planned_at_tensor_parallelism(capsys):
    """StarCoder (48 query heads, 1 key/value head) may use TP; a rank keeps the all-gathered
    QKV output for the backward."""
    assert plan_main(["--model", "starcoder", "--gpus", "8", "--seq", "8192", "--tp", "4"]) == 0
    assert "TP=4 " in capsys.readouterr().out.split("proposed: ")[1].splitlines()[0]
    mqa = Shape(**{**GPT.__dict__, "groups": 1})
    d, t = H // A, 4
    layout = Layout(seq=S, micro_batch=B, tp=t, sp=True)
    qkv_mha, qkv_mqa = 4 * A * d / t, (A + 2) * d + A * d / t  # per token: Q, K, V, proj input
    assert layer_activation_bytes(mqa, layout) - layer_activation_bytes(GPT, layout) \
        == pytest.approx(2 * S * B * (qkv_mqa - qkv_mha))


def test_estimate_picks_the_busiest_stage():
    model = Shape(layers=4, hidden=256, ffn=1024, heads=4, groups=4, head_dim=64, vocab=150000)
    layout = Layout(pp=2, seq=1024, global_batch=8)
    first = activation_bytes(model, layout, 0)
    memory = estimate(model, layout, overhead_gib=0)
    assert memory.activations in (first, activation_bytes(model, layout, 1))
    assert memory.total <= 2 * 1024 * GIB and memory.logits > 0  # last stage: big vocabulary


def test_cli_lists_plan():
    from megatron_patch.cli import COMMANDS

    assert COMMANDS["plan"][0] == "megatron_patch.launch.plan"
    assert Path(__file__).parents[1].joinpath("megatron_patch/launch/plan.py").is_file()


def test_experts_are_split_by_expert_parallelism():
    from megatron_patch.launch.plan import candidates

    moe = Shape(layers=4, hidden=512, ffn=1024, heads=8, groups=8, head_dim=64, vocab=32768,
                experts=8, topk=2, moe_ffn=1024, moe_pattern=(1, 1, 1, 1))
    one, four = (stage_params(moe, Layout(ep=ep, dp=4), 0) for ep in (1, 4))
    assert one.dense == four.dense and four.expert * 4 == one.expert
    # Expert optimizer states shard over the expert data-parallel ranks (world/(EP*ETP*PP)).
    sharded = state_bytes(four, Layout(ep=4, dp=4, distributed_optimizer=True))[2]
    assert sharded == pytest.approx(12 * four.dense / 4 + 12 * four.expert / 1)
    found = candidates(moe, gpus=8, seq=1024, global_batch=64, gpu_mem_gib=80)
    assert {c.layout.ep for c in found} >= {1, 2, 4, 8}


def test_plan_proposes_only_layouts_the_parallel_rules_accept():
    """plan's filter is ParallelLayout's: TP must also divide the FFN size (8 heads would allow
    TP=8; the FFN size 1020 = 4 x 255 does not)."""
    from megatron_patch.launch.plan import candidates

    model = Shape(layers=4, hidden=512, ffn=1020, heads=8, groups=8, head_dim=64, vocab=32768)
    found = candidates(model, gpus=8, seq=1024, global_batch=64, gpu_mem_gib=80)
    assert {c.layout.tp for c in found} == {1, 2, 4}
    assert not [c.layout for c in found if c.layout.parallel.problems(model.layout_args())]
