"""One set of parallel-layout rules (megatron_patch/parallel_layout.py): each rule, and the
launcher, Megatron's argument checks and the converter refusing the same layouts in their own
words."""

import re

import pytest

from megatron_patch.arguments import parse_training_args
from megatron_patch.config_checks import MEGATRON_WORDING, ConfigError
from megatron_patch.conversion.engine import ConversionError
from megatron_patch.conversion.layout import CONVERT_WORDING, check_parallel_layout
from megatron_patch.launch.command import LAUNCHER_FIELDS, LAUNCHER_NAMES, validate
from megatron_patch.launch.settings import LaunchError, RunSettings
from megatron_patch.parallel_layout import (
    REFUSED,
    RULES,
    TRAINING,
    UNUSED,
    LauncherWording,
    ParallelLayout,
)
from megatron_patch.runtime.backends import Backends
from tests.launch import MOCK_DATA, TINY_MODEL

CPU = Backends(cuda=False, transformer_engine=False, apex=False, flash_attn=False)
# TINY_MODEL's values, as a family mapping gives them
MODEL = {"num_attention_heads": 4, "num_query_groups": 2, "group_query_attention": True,
         "num_layers": 4, "hidden_size": 64, "ffn_hidden_size": 128,
         "max_position_embeddings": 32}
MOE = {**MODEL, "num_experts": 4, "moe_ffn_hidden_size": 6}
MOE_FLAGS = ["--num-experts", "4", "--moe-ffn-hidden-size", "6"]


# rule, layout, model, kind, decided by the process count
RULE_CASES = [
    ("world", dict(tp=2, world=3), MODEL, REFUSED, True),
    ("heads", dict(tp=3), {**MODEL, "ffn_hidden_size": 96}, REFUSED, False),
    ("kv_heads", dict(tp=2), {**MODEL, "num_attention_heads": 6, "num_query_groups": 3,
                              "hidden_size": 96}, REFUSED, False),
    ("ffn", dict(tp=2), {**MODEL, "ffn_hidden_size": 129}, REFUSED, False),
    ("layers", dict(pp=3), MODEL, REFUSED, False),
    ("virtual_layers", dict(pp=2, vpp=3), MODEL, REFUSED, False),
    ("virtual_needs_pipeline", dict(vpp=2), MODEL, REFUSED, False),
    ("sp_needs_tp", dict(sp=True), MODEL, UNUSED, False),
    ("sp_sequence", dict(tp=2, sp=True, seq=127), MODEL, TRAINING, False),
    ("cp_sequence", dict(cp=2, seq=130), MODEL, REFUSED, False),
    ("experts_needed", dict(ep=2), MODEL, REFUSED, False),
    ("experts", dict(ep=3), MOE, REFUSED, False),
    ("expert_ffn", dict(etp=4), MOE, REFUSED, False),
    ("expert_world", dict(ep=2, world=3), MOE, REFUSED, True),
    ("ep_tp_needs_sp", dict(ep=2, tp=2), MOE, TRAINING, False),
    ("batch", dict(world=2, micro_batch=1, global_batch=3), MODEL, REFUSED, True),
    ("virtual_microbatches", dict(pp=2, vpp=2, world=2, micro_batch=1, global_batch=1), MODEL,
     REFUSED, True),
]


@pytest.mark.parametrize("rule, layout, model, kind, needs_world", RULE_CASES)
def test_each_rule(rule, layout, model, kind, needs_world):
    (problem,) = ParallelLayout(**layout).problems(model)
    assert (problem.rule, problem.kind, problem.needs_world) == (rule, kind, needs_world)
    launcher = LauncherWording(LAUNCHER_NAMES, LAUNCHER_FIELDS)
    for wording in (launcher, MEGATRON_WORDING):  # both name every size
        assert problem.message(wording)


def test_the_table_covers_every_rule():
    assert [case[0] for case in RULE_CASES] == list(RULES)


def test_a_valid_layout_has_no_problems():
    layout = ParallelLayout(tp=2, pp=2, vpp=2, cp=2, ep=2, etp=1, sp=True, world=16,
                            micro_batch=1, global_batch=8, seq=128)
    assert layout.problems(MOE) == []
    # Unknown sizes are not checked: the converter knows no processes, batch or SP.
    assert ParallelLayout(tp=2, ep=2, sp=None).problems(MOE) == []


def test_derived_sizes():
    layout = ParallelLayout.of_replicas(4, tp=2, pp=2, cp=2, ep=4, etp=1, micro_batch=2,
                                        global_batch=64)
    assert (layout.world, layout.dp, layout.microbatches) == (32, 4, 8)
    assert (layout.expert_model_parallel, layout.expert_dp) == (8, 4)  # EP x ETP x PP = 4 x 1 x 2
    assert ParallelLayout(tp=2, ep=2).expert_dp is None  # the process count is not known


# Refused by all three, each in its own words: (layout, MoE, processes, launcher's message,
# Megatron's, the converter's).
SAME_REFUSALS = [
    (dict(tp=3), False, 3, "TP=3 must divide the 4 attention heads",
     "--tensor-model-parallel-size 3 must divide --num-attention-heads 4",
     "--tp 3 must divide num_attention_heads=4"),
    (dict(pp=3), False, 3, "PP=3 must divide the 4 layers",
     "--pipeline-model-parallel-size 3 must divide --num-layers 4",
     "--pp 3 must divide num_layers=4"),
    (dict(vpp=2), False, 1, "VPP=2 (an interleaved pipeline) needs PP>1",
     "--num-virtual-stages-per-pipeline-rank 2 (an interleaved pipeline) needs "
     "--pipeline-model-parallel-size > 1",
     "--vpp 2 (an interleaved pipeline) needs --pp > 1"),
    (dict(ep=2), False, 2, "EP=2/ETP=None need a mixture-of-experts model",
     "--expert-model-parallel-size 2/--expert-tensor-parallel-size None need a "
     "mixture-of-experts model",
     "--ep 2/--etp None need a mixture-of-experts model"),
    (dict(ep=3), True, 3, "EP=3 must divide the 4 experts",
     "--expert-model-parallel-size 3 must divide --num-experts 4",
     "--ep 3 must divide the 4 routed experts"),
    (dict(etp=4), True, 4, "ETP=4 must divide the expert FFN size 6",
     "--expert-tensor-parallel-size 4 must divide --moe-ffn-hidden-size 6",
     "expert tensor parallel size 4 must divide the expert FFN size moe_ffn_hidden_size=6"),
]
MEGATRON_FLAGS = {"tp": "--tensor-model-parallel-size", "pp": "--pipeline-model-parallel-size",
                  "vpp": "--num-virtual-stages-per-pipeline-rank",
                  "ep": "--expert-model-parallel-size", "etp": "--expert-tensor-parallel-size"}


@pytest.mark.parametrize("sizes, moe, world, launcher, megatron, converter", SAME_REFUSALS)
def test_launcher_training_checks_and_converter_refuse_the_same_layouts(
        monkeypatch, sizes, moe, world, launcher, megatron, converter):
    model = MOE if moe else MODEL
    settings = RunSettings(model_size="tiny", seq_len=32, pad_len=32, batch_size=1,
                           global_batch_size=12, **sizes)
    with pytest.raises(LaunchError, match=re.escape(launcher)):
        validate(settings, model, world, CPU)

    monkeypatch.setenv("WORLD_SIZE", str(world))
    flags = [word for key, value in sizes.items() for word in (MEGATRON_FLAGS[key], str(value))]
    with pytest.raises(ConfigError, match=re.escape(megatron)):
        parse_training_args(TINY_MODEL + MOCK_DATA + (MOE_FLAGS if moe else []) + flags + [
            "--micro-batch-size", "1", "--global-batch-size", "12", "--train-iters", "2"])

    with pytest.raises(ConversionError, match=re.escape(converter)):
        check_parallel_layout(model, ParallelLayout(**sizes, sp=None))


def test_settings_without_effect_are_left_to_megatron(monkeypatch):
    """SP at TP=1: the launcher refuses it as a mistake; Megatron turns it off (a warning)."""
    with pytest.raises(LaunchError, match="SP=true needs TP>1"):
        validate(RunSettings(model_size="tiny", seq_len=32, pad_len=32, sp=True), MODEL, 1, CPU)
    monkeypatch.setenv("WORLD_SIZE", "1")
    args = parse_training_args(TINY_MODEL + MOCK_DATA + [
        "--sequence-parallel", "--micro-batch-size", "1", "--global-batch-size", "1",
        "--train-iters", "2"])
    assert not args.sequence_parallel
    # ETP on a model without experts: refused by the converter, not by Megatron.
    with pytest.raises(ConversionError, match=re.escape(
            "--ep 1/--etp 2 need a mixture-of-experts model; this one has no routed experts")):
        check_parallel_layout(MODEL, ParallelLayout(etp=2, sp=None))
    assert CONVERT_WORDING.model == "this one"
