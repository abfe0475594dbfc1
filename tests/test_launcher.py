"""The Pai-style launcher: positional settings, validation before launch, composed commands."""

import dataclasses
import sys

import pytest

from megatron_patch.launch.command import SHIPPED_CHAT, compose, validate
from megatron_patch.launch.settings import POSITIONAL, LaunchError, RunSettings, parse_positional
from megatron_patch.runtime.backends import Backends
from tests.launch import REPO

CPU = Backends(cuda=False, transformer_engine=False, apex=False, flash_attn=False)
GPU = Backends(cuda=True, transformer_engine=False, apex=False, flash_attn=False)


def _value(command, flag):
    return command[command.index(flag) + 1]


def test_positional_order_is_pai_megatron_patch():
    assert POSITIONAL == (
        "ENV", "MODEL_SIZE", "BATCH_SIZE", "GLOBAL_BATCH_SIZE", "LR", "MIN_LR", "SEQ_LEN",
        "PAD_LEN", "PR", "TP", "PP", "CP", "SP", "DO", "FL", "AC", "SAVE_INTERVAL",
        "DATASET_PATH", "PRETRAIN_CHECKPOINT_PATH", "TRAIN_TOKENS", "WARMUP_TOKENS",
        "OUTPUT_BASEPATH")


def test_no_arguments_is_the_tiny_cpu_demo(tmp_path, monkeypatch):
    monkeypatch.delenv("NPROC_PER_NODE", raising=False)
    settings, extra = parse_positional([])
    launch = compose("llama", "pretrain", RunSettings(output_basepath=str(tmp_path)), extra, CPU)
    cmd = launch.train
    assert "--nproc-per-node=1" in cmd and "--bf16" not in cmd
    assert _value(cmd, "--train-iters") == "200" and _value(cmd, "--hidden-size") == "256"
    assert _value(cmd, "--patch-tokenizer-type") == "TinyTokenizer"
    assert _value(cmd, "--data-path") == f"{tmp_path}/data/tiny_corpus_text_document"
    assert launch.prepare and "preprocess" in launch.prepare[0]
    assert "--load" not in cmd


def test_full_positional_command_for_a_cluster(monkeypatch):
    monkeypatch.setenv("WORLD_SIZE", "4")
    monkeypatch.setenv("RANK", "2")
    monkeypatch.setenv("MASTER_ADDR", "node0")
    monkeypatch.setenv("MASTER_PORT", "29500")
    monkeypatch.setenv("NPROC_PER_NODE", "8")
    argv = ["dlc", "8B", "1", "256", "3e-4", "3e-5", "8192", "8192", "bf16", "4", "2", "1",
            "true", "true", "true", "sel", "500", "0.3 /d/a 0.7 /d/b", "/ckpt/llama31-8b",
            "10B", "100M", "/out", "--log-interval", "1"]
    settings, extra = parse_positional(argv)
    cmd = compose("llama", "pretrain", settings, extra, GPU).train
    for flag in ("--nnodes=4", "--node-rank=2", "--master-addr=node0", "--master-port=29500",
                 "--nproc-per-node=8", "--bf16", "--sequence-parallel",
                 "--use-distributed-optimizer", "--recompute-activations", "--use-rope-scaling",
                 "--finetune", "--no-load-optim"):
        assert flag in cmd, flag
    assert _value(cmd, "--num-query-groups") == "8" and _value(cmd, "--ffn-hidden-size") == "14336"
    assert _value(cmd, "--rotary-base") == "500000" and _value(cmd, "--vocab-size") == "128256"
    assert _value(cmd, "--train-iters") == str(10_000_000_000 // (256 * 8192))
    assert cmd[cmd.index("--data-path") + 1:cmd.index("--data-path") + 5] == [
        "0.3", "/d/a", "0.7", "/d/b"]
    assert _value(cmd, "--load") == "/ckpt/llama31-8b"
    assert _value(cmd, "--patch-tokenizer-path") == "/ckpt/llama31-8b"
    assert cmd[-2:] == ["--log-interval", "1"]


@pytest.mark.parametrize(("settings", "message"), [
    (dict(tp=3), "TP=3 must divide the 4 attention heads"),
    (dict(pp=3), "PP=3 must divide the 4 layers"),
    (dict(sp=True), "SP=true needs TP>1"),
    (dict(cp=2, seq_len=130), "SEQ_LEN=130 must be a multiple of 4"),
    (dict(pr="bf16"), "PR=bf16 needs a GPU"),
    (dict(global_batch_size=12), "must be a multiple of BATCH_SIZE*DP"),
])
def test_invalid_combinations_fail_before_launch(settings, message, monkeypatch):
    monkeypatch.delenv("NPROC_PER_NODE", raising=False)
    with pytest.raises(LaunchError, match=message.replace("*", r"\*")):
        compose("llama", "pretrain", RunSettings(**settings), [], CPU)


def test_bad_positional_values_name_the_setting():
    with pytest.raises(LaunchError, match="BATCH_SIZE='eight'"):
        parse_positional(["dsw", "tiny", "eight"])
    with pytest.raises(LaunchError, match="PR='int4'"):
        parse_positional(["dsw", "tiny", "8", "16", "1e-3", "1e-4", "128", "128", "int4"])
    with pytest.raises(ValueError, match="MODEL_SIZE='9B'"):
        compose("llama", "pretrain", RunSettings(model_size="9B"), [], CPU)


def test_dlc_without_job_environment_is_an_error(monkeypatch):
    for name in ("WORLD_SIZE", "RANK", "MASTER_ADDR", "MASTER_PORT"):
        monkeypatch.delenv(name, raising=False)
    with pytest.raises(LaunchError, match="ENV=dlc"):
        compose("llama", "pretrain", RunSettings(env="dlc"), [], CPU)


def _clear_job_environment(monkeypatch):
    for name in ("WORLD_SIZE", "RANK", "MASTER_ADDR", "MASTER_PORT", "NPROC_PER_NODE",
                 "TOKENIZER_PATH"):
        monkeypatch.delenv(name, raising=False)


def test_dry_run_composes_for_gpu_nodes_from_a_cpu_machine(monkeypatch):
    """Hardware and world checks become notes, placeholders stand for the job's variables;
    checks of the model and settings stay errors, and a real run keeps every error."""
    _clear_job_environment(monkeypatch)
    settings = RunSettings(env="dlc", model_size="8B", pr="bf16", tp=2, pp=2, sp=True,
                           batch_size=1, global_batch_size=13)
    launch = compose("llama", "pretrain", settings, [], CPU, dry_run=True)
    cmd = launch.train
    for flag in ("--nproc-per-node=8", "--nnodes=${WORLD_SIZE}", "--node-rank=${RANK}",
                 "--master-addr=${MASTER_ADDR}", "--master-port=${MASTER_PORT}", "--bf16"):
        assert flag in cmd, flag
    assert _value(cmd, "--patch-tokenizer-path") == "${TOKENIZER_PATH}"
    assert launch.env == {"CUDA_DEVICE_MAX_CONNECTIONS": "1"}
    notes = "\n".join(launch.notes)
    assert "composed for GPU nodes (PR=bf16)" in notes and "8 GPUs per node assumed" in notes
    assert "check on the target: GLOBAL_BATCH_SIZE=13 must be a multiple of BATCH_SIZE*DP=1*2" \
        in notes
    with pytest.raises(LaunchError, match="TP=3 must divide the 32 attention heads"):
        compose("llama", "pretrain", dataclasses.replace(settings, tp=3), [], CPU, dry_run=True)
    with pytest.raises(LaunchError, match="ENV=dlc reads the job's"):
        compose("llama", "pretrain", settings, [], CPU)
    # The job's variables given: its world is known, so the batch check is an error again.
    for name, value in [("WORLD_SIZE", "2"), ("RANK", "0"), ("MASTER_ADDR", "n0"),
                        ("MASTER_PORT", "1"), ("NPROC_PER_NODE", "8")]:
        monkeypatch.setenv(name, value)
    with pytest.raises(LaunchError, match=r"BATCH_SIZE\*DP=1\*4"):
        compose("llama", "pretrain", settings, [], CPU, dry_run=True)


def test_dry_run_on_a_cpu_machine_without_gpu_settings_composes_for_it(monkeypatch):
    _clear_job_environment(monkeypatch)
    cmd = compose("llama", "pretrain", RunSettings(tp=2), [], CPU, dry_run=True).train
    assert "--nproc-per-node=2" in cmd and "--bf16" not in cmd


def test_dry_run_commands_through_the_scripts(tmp_path):
    """README's DRY_RUN examples on this machine (no GPU) print a GPU command and exit 0 (a
    real run keeps the refusal: test_invalid_combinations_fail_before_launch)."""
    import os
    import subprocess
    from pathlib import Path

    examples = Path(__file__).resolve().parents[1] / "examples"
    env = {k: v for k, v in os.environ.items() if k not in (
        "WORLD_SIZE", "RANK", "MASTER_ADDR", "MASTER_PORT", "NPROC_PER_NODE", "TOKENIZER_PATH")}
    env.update(DRY_RUN="1", PYTHON=sys.executable)
    run_mcore = [str(examples / "llama" / "run_mcore_llama.sh"), "--model-size", "8B", "--tp",
                 "2", "--pp", "2", "--sp", "true", "--pr", "bf16", "--output", str(tmp_path)]
    dlc = [str(examples / "llama" / "run_pretrain_mcore_llama.sh"), "dlc", "8B", "1", "256",
           "3e-4", "3e-5", "8192", "8192", "bf16", "4", "2", "1", "true", "true", "true", "sel",
           "500", "0.3 /data/web_text_document 0.7 /data/code_text_document",
           "/ckpt/llama3.1-8b-mcore", "10B", "100M", str(tmp_path), "--log-interval", "1"]
    for argv, expected in [(run_mcore, "--nnodes=1"), (dlc, '"--nnodes=${WORLD_SIZE}"')]:
        result = subprocess.run(["bash", *argv], capture_output=True, text=True, env=env)
        assert result.returncode == 0, result.stderr
        command = result.stdout.splitlines()[-1]
        assert command.startswith("CUDA_DEVICE_MAX_CONNECTIONS=1 ") and "--bf16" in command
        assert "--nproc-per-node=8" in command and expected in command
        assert "note: NPROC_PER_NODE unset: 8 GPUs per node assumed" in result.stdout


def test_finetune_default_is_the_tiny_chat_demo(tmp_path, monkeypatch):
    monkeypatch.delenv("NPROC_PER_NODE", raising=False)
    monkeypatch.delenv("SFT_PACKING", raising=False)
    settings, extra = parse_positional([], "finetune")
    settings = RunSettings(**{**settings.__dict__, "output_basepath": str(tmp_path)})
    launch = compose("llama", "finetune", settings, extra, CPU)
    cmd = launch.train
    assert cmd[cmd.index("-m", cmd.index("-m") + 1) + 1] == "megatron_patch.training.finetune"
    assert _value(cmd, "--data-path") == str(SHIPPED_CHAT) and SHIPPED_CHAT.is_file()
    assert "--sft-packing" in cmd and not launch.prepare
    assert _value(cmd, "--seq-length") == "128" and _value(cmd, "--train-iters") == "100"
    assert _value(cmd, "--patch-tokenizer-type") == "TinyTokenizer" and "--load" not in cmd
    assert launch.name.startswith("finetune-mcore-llama-tiny-")


def test_finetune_trains_on_pad_len_sequences(monkeypatch):
    monkeypatch.setenv("SFT_PACKING", "false")
    argv = ["dsw", "tiny", "4", "16", "1e-5", "1e-6", "256", "64", "auto", "1", "1", "1",
            "false", "false", "true", "none", "50", "/data/sft.jsonl", "/ckpt/tiny", "1024000",
            "102400", "/out", "--sft-train-on-prompt"]
    settings, extra = parse_positional(argv)
    cmd = compose("llama", "finetune", settings, extra, CPU).train
    assert _value(cmd, "--seq-length") == "64"
    assert _value(cmd, "--train-iters") == str(1024000 // (16 * 64))
    assert _value(cmd, "--data-path") == "/data/sft.jsonl" and "--sft-packing" not in cmd
    assert _value(cmd, "--load") == "/ckpt/tiny" and "--finetune" in cmd
    assert cmd[-1] == "--sft-train-on-prompt"


@pytest.mark.parametrize(("mode", "settings", "message"), [
    ("finetune", dict(seq_len=128, pad_len=256), "PAD_LEN=256 must not exceed SEQ_LEN=128"),
    ("pretrain", dict(train_tokens=16 * 128 * 10, warmup_tokens=16 * 128 * 10),
     "the 10 warm-up iterations must be fewer than the 10 training iterations"),
])
def test_finetune_and_schedule_checks(mode, settings, message, monkeypatch):
    monkeypatch.delenv("NPROC_PER_NODE", raising=False)
    with pytest.raises(LaunchError, match=message):
        compose("llama", mode, RunSettings(**settings), [], CPU)


# ---------------------------------------------------------------------------- model sizes, flags


def _registered_sizes():
    from megatron_patch.launch.model_sizes import family_sizes
    from megatron_patch.models.registry import registered_families

    return [(family, model) for family in registered_families()
            for model in family_sizes(family)]


def test_every_size_renders_flags_megatron_parses_back():
    """The rendered flags, read by Megatron's own parser, give back the family's values."""
    import argparse

    from megatron.training.arguments import add_megatron_arguments

    from megatron_patch.arguments import add_patch_arguments
    from megatron_patch.launch.flags import megatron_flags
    from megatron_patch.models.registry import get_family

    parser = add_patch_arguments(add_megatron_arguments(argparse.ArgumentParser(
        allow_abbrev=False)))
    sizes = _registered_sizes()
    assert {m.name for _, m in sizes} >= {"llama3.1-8b", "qwen2.5-72b", "qwen3-32b",
                                          "mistral-7b-v0.1", "llama2-70b", "llama3.1-405b"}
    inexpressible = set()
    for family, model in sizes:
        values = get_family(family).hf_to_megatron(model.hf_config)
        try:
            flags = megatron_flags(values)
        except ValueError as exc:
            assert "cannot express" in str(exc), exc
            inexpressible.add(model.name)
            continue
        parsed = vars(parser.parse_args(flags))
        for dest, value in values.items():
            got = parsed[dest]
            assert (list(got) if isinstance(got, tuple) else got) == \
                (list(value) if isinstance(value, tuple) else value), (model.name, dest)
    # StarCoder2-3B's rope_theta 999999.44 has no Megatron flag (--rotary-base is an int): the
    # launcher says so and takes the model's HF directory instead.
    assert inexpressible == {"starcoder2-3b"}


def test_sizes_belong_to_their_family():
    """A family's sizes are configs of its own architectures; names are unique across families
    and MODEL_SIZEs within a family (lookups are case-insensitive)."""
    from megatron_patch.models.registry import family_for_hf_config, registered_families

    sizes = _registered_sizes()
    for family, model in sizes:
        assert family_for_hf_config(model.hf_config).name == family, model.name
        assert model.name == model.name.lower(), model.name
    names = [model.name for _, model in sizes]
    assert len(names) == len(set(names))
    for family in registered_families():
        spelled = [m.size.lower() for f, m in sizes if f == family]
        assert len(spelled) == len(set(spelled)), family


def test_window_size_is_one_comma_separated_token():
    from megatron_patch.launch.flags import megatron_flags

    assert megatron_flags({"window_size": (7, 0)}) == ["--window-size", "7,0"]
    assert megatron_flags({"data_path": ["1", "a"]}) == ["--data-path", "1", "a"]


def test_sizes_are_the_published_architectures():
    from megatron_patch.launch.model_sizes import find_size
    from megatron_patch.models.registry import get_family

    def values(family, size):
        return get_family(family).hf_to_megatron(find_size(family, size).hf_config)

    llama = values("llama", "8B")
    assert (llama["num_layers"], llama["hidden_size"], llama["ffn_hidden_size"],
            llama["num_attention_heads"], llama["num_query_groups"], llama["rotary_base"],
            llama["use_rope_scaling"], llama["rope_scaling_factor"], llama["vocab_size"]) == \
        (32, 4096, 14336, 32, 8, 500000, True, 8.0, 128256)
    assert values("llama", "llama2-70b")["num_query_groups"] == 8
    assert values("llama", "LLAMA3.2-1B")["untie_embeddings_and_output_weights"] is False
    qwen = values("qwen2", "72B")
    assert (qwen["num_layers"], qwen["hidden_size"], qwen["ffn_hidden_size"],
            qwen["add_qkv_bias"], qwen["vocab_size"]) == (80, 8192, 29568, True, 152064)
    qwen3 = values("qwen3", "0.6B")
    assert (qwen3["kv_channels"], qwen3["qk_layernorm"], qwen3["hidden_size"]) == (128, True, 1024)
    assert values("mistral", "7B-v0.1")["window_size"] == (4095, 0)
    assert values("mistral", "7B")["window_size"] is None


# ---------------------------------------------------------------------------- named flags, layouts

NAMED = ["--env", "dsw", "--model-size", "8B", "--mbs", "2", "--gbs", "64", "--lr", "2e-4",
         "--min-lr", "2e-5", "--seq-len", "4096", "--pad-len", "4096", "--pr", "bf16",
         "--tp", "2", "--pp", "2", "--cp", "1", "--sp", "--do", "true", "--fl", "false",
         "--ac", "full", "--save-interval", "50", "--data-path", "0.5", "/d/a", "0.5", "/d/b",
         "--load", "/ckpt/llama", "--output", "/out"]


def _train(argv, layout, mode, monkeypatch, backends=GPU):
    from megatron_patch.launch.settings import parse_launch

    monkeypatch.setenv("NPROC_PER_NODE", "8")
    parsed = parse_launch(argv, layout, mode)
    return parsed, compose("llama", parsed.mode, parsed.settings, parsed.extra, backends).train


def test_named_flags_give_the_positional_command(monkeypatch):
    positional = ["dsw", "8B", "2", "64", "2e-4", "2e-5", "4096", "4096", "bf16", "2", "2", "1",
                  "true", "true", "false", "full", "50", "0.5 /d/a 0.5 /d/b", "/ckpt/llama",
                  str(4096 * 64 * 100), str(4096 * 64 * 10), "/out"]
    named = [*NAMED, "--train-tokens", str(4096 * 64 * 100), "--warmup-tokens",
             str(4096 * 64 * 10)]
    _, by_position = _train(positional, "pai", "pretrain", monkeypatch)
    _, by_name = _train(named, "pai", "pretrain", monkeypatch)
    assert by_name == by_position
    assert _value(by_position, "--train-iters") == "100"
    assert ["--recompute-granularity", "full"] == by_position[
        by_position.index("--recompute-granularity"):by_position.index("--recompute-granularity")
        + 2]
    # Named flags after positions win over them.
    _, mixed = _train([*positional, "--tp", "4", "--log-interval", "1"], "pai", "pretrain",
                      monkeypatch)
    assert _value(mixed, "--tensor-model-parallel-size") == "4" and mixed[-2:] == [
        "--log-interval", "1"]


def test_run_mcore_order_and_sft_iterations(monkeypatch):
    monkeypatch.delenv("MODE", raising=False)
    mcore = ["dsw", "8B", "2", "64", "2e-4", "2e-5", "4096", "4096", "bf16", "2", "2", "1",
             "true", "true", "false", "true", "full", "false", "50", "0.5 /d/a 0.5 /d/b",
             "/d/valid", "/ckpt/llama", "300", "30", "/out"]
    parsed, by_position = _train(mcore, "mcore", None, monkeypatch)
    assert parsed.mode == "finetune" and parsed.settings.train_iters == 300
    named = [*NAMED, "--mode", "sft", "--train-iters", "300", "--warmup-iters", "30",
             "--valid-data-path", "/d/valid"]
    _, by_name = _train(named, "mcore", None, monkeypatch)
    assert by_name == by_position
    assert by_position[by_position.index("-m", by_position.index("-m") + 1) + 1] == \
        "megatron_patch.training.finetune"
    assert _value(by_position, "--valid-data-path") == "/d/valid" and "--split" not in by_position
    assert _value(by_position, "--lr-warmup-iters") == "30"
    # MODE=sft in the environment selects the same entry point; disagreeing sources are refused.
    monkeypatch.setenv("MODE", "sft")
    _, by_env = _train(NAMED + ["--train-iters", "300", "--warmup-iters", "30",
                                "--valid-data-path", "/d/valid"], "mcore", None, monkeypatch)
    assert by_env == by_position
    with pytest.raises(LaunchError, match="conflicting modes: SFT says pretrain, MODE says sft"):
        _train(mcore[:15] + ["false"], "mcore", None, monkeypatch)


def test_moe_order_has_etp_and_ep():
    from megatron_patch.launch.settings import MCORE_MOE_POSITIONAL, parse_launch

    assert MCORE_MOE_POSITIONAL[12:14] == ("ETP", "EP")
    parsed = parse_launch(["dsw", "A3B", "1", "32", "1e-4", "1e-5", "2048", "2048", "bf16",
                           "2", "1", "1", "1", "4", "true", "true", "true", "false", "sel",
                           "0.5"], "mcore-moe")
    s = parsed.settings
    assert (s.tp, s.etp, s.ep, s.sp, s.ac, s.offload_fraction) == (2, 1, 4, True, "sel", 0.5)


def test_new_switches_render_megatron_flags(monkeypatch, tmp_path):
    monkeypatch.setenv("TOKENIZER_PATH", "/tok")
    _, cmd = _train(["--model-size", "70B", "--tp", "4", "--pp", "2", "--vpp", "2", "--sp",
                     "--gbs", "64", "--mbs", "1", "--seq-len", "8192", "--optimizer-offload",
                     "true", "--save", str(tmp_path / "ckpt"), "--train-iters", "10"],
                    "pai", "pretrain", monkeypatch)
    assert _value(cmd, "--num-virtual-stages-per-pipeline-rank") == "2"
    assert "--use-distributed-optimizer" in cmd and "--use-precision-aware-optimizer" in cmd
    assert _value(cmd, "--optimizer-offload-fraction") == "1"
    assert _value(cmd, "--save") == str(tmp_path / "ckpt") and "--load" not in cmd


def test_composed_command_passes_megatrons_own_validation(monkeypatch):
    from megatron_patch.conversion.layout import parse_megatron_args

    monkeypatch.setenv("TOKENIZER_PATH", "/tok")
    monkeypatch.setenv("WORLD_SIZE", "8")
    _, cmd = _train(["--model-size", "70B", "--tp", "2", "--pp", "2", "--vpp", "2", "--sp",
                     "--do", "--ac", "sel", "--gbs", "32", "--mbs", "1", "--seq-len", "4096",
                     "--train-iters", "10", "--warmup-iters", "1", "--data-path", "/d/x"],
                    "pai", "pretrain", monkeypatch)
    args = parse_megatron_args(cmd[cmd.index("-m", cmd.index("-m") + 1) + 2:])
    assert (args.num_layers, args.virtual_pipeline_model_parallel_size, args.data_parallel_size,
            args.recompute_granularity, args.rope_scaling_factor) == (80, 2, 2, "selective", 8.0)


@pytest.mark.parametrize(("settings", "message"), [
    (dict(pp=2, vpp=3), r"PP\*VPP=2\*3 must divide the 4 layers"),
    (dict(vpp=2), "VPP=2 .* needs PP>1"),
    (dict(pp=2, vpp=2, global_batch_size=8, batch_size=8), "1 micro-batches per step"),
    (dict(tp=2, sp=True, seq_len=127, pad_len=127), "SEQ_LEN=127 must be a multiple of TP=2"),
    (dict(ep=2), "EP=2/ETP=None need a mixture-of-experts model"),
])
def test_layout_checks_before_launch(settings, message, monkeypatch):
    monkeypatch.delenv("NPROC_PER_NODE", raising=False)
    with pytest.raises(LaunchError, match=message):
        compose("llama", "pretrain", RunSettings(**settings), [], CPU)


def test_multi_query_models_split_their_query_heads_over_tensor_parallel_ranks(monkeypatch):
    """One key/value head does not limit TP (each rank uses it whole); the query heads do."""
    monkeypatch.setenv("NPROC_PER_NODE", "2")
    cmd = compose("starcoder", "pretrain", RunSettings(tp=2, sp=True), [], CPU).train
    assert _value(cmd, "--tensor-model-parallel-size") == "2"
    assert "--group-query-attention" in cmd and "--num-query-groups" not in cmd  # default 1
    with pytest.raises(LaunchError, match="TP=2 must divide the 71 attention heads"):
        compose("falcon", "pretrain", RunSettings(model_size="7B", tp=2), [], CPU)
    with pytest.raises(LaunchError, match="TP=2: 3 key/value heads cannot be shared out"):
        validate(RunSettings(tp=2), {"num_attention_heads": 6, "num_query_groups": 3,
                                     "num_layers": 4, "hidden_size": 96}, 2, CPU)


def test_expert_checks():
    model = {"num_attention_heads": 8, "num_query_groups": 8, "num_layers": 4, "num_experts": 6}
    te = Backends(cuda=True, transformer_engine=True, apex=False, flash_attn=False)
    with pytest.raises(LaunchError, match="EP=4 must divide the 6 experts"):
        validate(RunSettings(ep=4), model, 4, te)
    with pytest.raises(LaunchError, match="EP=2 with TP=2 needs SP=true"):
        validate(RunSettings(ep=2, tp=2, global_batch_size=16), model, 4, te)
    with pytest.raises(LaunchError, match=r"not divisible by EP\*ETP\*PP=3\*2\*1"):
        validate(RunSettings(ep=3, etp=2, tp=2, sp=True), model, 4, te)
    validate(RunSettings(ep=2, tp=2, sp=True, cp=1, global_batch_size=16), model, 4, te)


def test_model_size_may_be_an_hf_directory(tmp_path, monkeypatch):
    import json

    from megatron_patch.launch.model_sizes import find_size

    monkeypatch.delenv("NPROC_PER_NODE", raising=False)
    (tmp_path / "config.json").write_text(json.dumps(find_size("qwen2", "tiny").hf_config))
    settings = RunSettings(model_size=str(tmp_path), pretrain_checkpoint_path=str(tmp_path))
    cmd = compose("qwen2", "pretrain", settings, [], CPU).train
    assert _value(cmd, "--hf-config-path") == str(tmp_path) and "--hidden-size" not in cmd
    with pytest.raises(LaunchError, match="is a qwen2 model, not llama"):
        compose("llama", "pretrain", settings, [], CPU)
    with pytest.raises(LaunchError, match="cannot express 999999.44.*HF directory instead"):
        compose("starcoder2", "pretrain", RunSettings(model_size="3B", pretrain_checkpoint_path=str(
            tmp_path)), [], CPU)


def test_every_family_has_a_run_mcore_launcher(tmp_path):
    """Every registered family has its script; its header lists the family's sizes."""
    import os
    import re
    import subprocess
    from pathlib import Path

    from megatron_patch.launch.model_sizes import family_sizes
    from megatron_patch.models.common.vision import VisionLanguageFamily
    from megatron_patch.models.registry import get_family, registered_families

    examples = Path(__file__).resolve().parents[1] / "examples"
    launchers = {"qwen2_vl": "qwen2_5_vl"}  # one script for Qwen2-VL and Qwen2.5-VL
    for family in registered_families():
        name = launchers.get(family, family)
        script = examples / name / f"run_mcore_{name}.sh"
        assert script.is_file(), script
        if isinstance(get_family(family), VisionLanguageFamily):  # own launcher (tests/vlm)
            continue
        header = script.read_text()
        assert f"run_mcore.sh\" {family} " in header
        for model in family_sizes(family):
            assert re.search(rf"[ ;(]{re.escape(model.size)}[ ;)\n]", header), (family, model)
    env = {**os.environ, "DRY_RUN": "1", "MODE": "sft", "PYTHON": sys.executable}
    env.pop("NPROC_PER_NODE", None)
    result = subprocess.run(
        ["bash", str(examples / "qwen3" / "run_mcore_qwen3.sh"), "--gbs", "32", "--output",
         str(tmp_path), "--log-interval", "1"], capture_output=True, text=True, env=env,
        check=True)
    command = result.stdout.splitlines()[-1]
    assert "-m megatron_patch.training.finetune --model-family qwen3" in command
    assert "--qk-layernorm" in command and "--global-batch-size 32" in command
    assert command.endswith("--log-interval 1")


def test_launcher_headers_list_every_size_of_the_table():
    """Each family launcher's header names every MODEL_SIZE of the family's sizes.py."""
    import re

    from megatron_patch.launch.model_sizes import family_sizes
    from megatron_patch.models.registry import registered_families

    scripts = {family: [REPO / "examples" / family / f"run_mcore_{family}.sh"]
               for family in registered_families()}
    scripts["llama"].append(REPO / "examples" / "llama" / "run_pretrain_mcore_llama.sh")
    missing = {}
    for family, paths in scripts.items():
        for path in paths:
            if not path.is_file():
                continue
            header = " ".join(line for line in path.read_text().splitlines()
                              if line.startswith("#"))
            words = set(re.findall(r"[\w.\-]+", header))
            absent = [m.size for m in family_sizes(family) if m.size not in words]
            if absent:
                missing[path.name] = absent
    assert not missing, missing


# ------------------------------------------------ the model of a --load checkpoint, preflight


@pytest.fixture(scope="module")
def converted_qwen2(tmp_path_factory):
    """A tiny random Qwen2 with the shipped tokenizer, converted to Megatron."""
    import shutil

    import transformers

    from megatron_patch.conversion import convert_hf_to_mcore
    from megatron_patch.conversion.tiny import save_random_model
    from megatron_patch.tokenizer.hf import TINY_TOKENIZER_DIR

    root = tmp_path_factory.mktemp("qwen2")
    config = transformers.Qwen2Config(
        hidden_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
        intermediate_size=128, vocab_size=2048, max_position_embeddings=256,
        tie_word_embeddings=True, use_sliding_window=False)
    save_random_model(config, root / "hf")
    for file in TINY_TOKENIZER_DIR.iterdir():
        shutil.copy(file, root / "hf")
    return convert_hf_to_mcore(root / "hf", root / "mcore", progress=False)


def test_load_of_a_converted_checkpoint_gives_model_and_tokenizer(converted_qwen2, monkeypatch):
    monkeypatch.delenv("TOKENIZER_PATH", raising=False)
    launch = compose("qwen2", "pretrain", RunSettings(
        pretrain_checkpoint_path=str(converted_qwen2), iterations=20), [], CPU)
    flags = launch.train
    assert _value(flags, "--num-layers") == "2" and _value(flags, "--hidden-size") == "64"
    assert _value(flags, "--patch-tokenizer-type") == "HFTokenizer"
    assert _value(flags, "--patch-tokenizer-path") == str(converted_qwen2.resolve())
    assert _value(flags, "--make-vocab-size-divisible-by") == "128"
    assert _value(flags, "--lr-warmup-iters") == "2"  # the default warm-up fits 20 iterations
    assert any("warm-up: 2 iterations" in note for note in launch.notes)
    with pytest.raises(LaunchError, match=r"MODEL_SIZE=tiny is not the model in --load .*"
                                          r"num_layers=4 \(checkpoint: 2\)"):
        compose("qwen2", "pretrain", RunSettings(
            model_size="tiny", pretrain_checkpoint_path=str(converted_qwen2)), [], CPU)
    with pytest.raises(LaunchError, match="holds a qwen2 model; train it with "
                                          "examples/qwen2/run_mcore_qwen2.sh"):
        compose("llama", "pretrain", RunSettings(
            pretrain_checkpoint_path=str(converted_qwen2)), [], CPU)


def test_missing_inputs_are_named_before_launch(tmp_path):
    from megatron_patch.launch.__main__ import main

    launch = compose("llama", "pretrain", RunSettings(
        dataset_path=f"0.5 {tmp_path}/a_text_document 0.5 {tmp_path}/b", save_path=str(
            tmp_path / "run")), [], CPU)
    assert [p.split(":")[0] for p in launch.problems] == [
        f"--data-path {tmp_path}/a_text_document", f"--data-path {tmp_path}/b"]
    assert "megatron-patch preprocess" in launch.problems[0]
    assert launch.train[launch.train.index("--tensorboard-dir") + 1] == str(
        tmp_path / "run" / "tensorboard")
    status = main(["llama", "mcore", "--data-path", str(tmp_path / "x"), "--load",
                   str(tmp_path / "nockpt"), "--model-size", "tiny"])
    assert status == 2
    (tmp_path / "run").mkdir()
    (tmp_path / "run" / "latest_checkpointed_iteration.txt").write_text("200")
    assert main(["llama", "mcore", "--save", str(tmp_path / "run")]) == 0


def test_terminal_shows_informative_lines_only():
    from megatron_patch.launch.console import ConsoleFilter

    lines = ["------------------------ arguments ------------------------",
             "  lr .............. 0.001",
             "-------------------- end of arguments ---------------------",
             "INFO:megatron.core.optimizer:Setting up optimizer",
             "/x/site-packages/megatron/core/a.py:1: UserWarning: experimental",
             "  warnings.warn(",
             " [2026] iteration       10/     200 | lm loss: 7.3E+00 |",
             " validation loss at iteration 10 | lm loss value: 6.5E+00 |",
             "Traceback (most recent call last):"]
    console = ConsoleFilter()
    assert [line for line in lines if console.shows(line)] == lines[-3:]


def test_finetune_load_messages_are_reworded():
    """--finetune loads (start from a checkpoint, generate, verify) say what Megatron does."""
    from megatron_patch.training.checkpoint import _finetune_load_message

    assert _finetune_load_message("could not find arguments in the checkpoint ...") is None
    assert _finetune_load_message(
        "  successfully loaded checkpoint from ck [ t 1/1, p 1/1 ] at iteration 0") == (
        "  successfully loaded checkpoint from ck [ t 1/1, p 1/1 ] (its weights only; the "
        "iteration count starts again at 0)")
    assert _finetune_load_message(" checkpoint version 3.0") == " checkpoint version 3.0"


def test_resumed_run_follows_this_commands_schedule(tmp_path):
    """Raising --train-iters of a finished run trains further (as the "training is complete"
    message says) instead of failing Megatron's learning-rate schedule check."""
    from megatron_patch.training.checkpoint import schedule_mismatch_message

    run = tmp_path / "run"
    fresh = compose("llama", "pretrain", RunSettings(save_path=str(run)), [], CPU).train
    assert "--load" not in fresh and "--override-opt_param-scheduler" not in fresh
    run.mkdir()
    (run / "latest_checkpointed_iteration.txt").write_text("200")
    resumed = compose("llama", "pretrain", RunSettings(save_path=str(run)), [], CPU).train
    assert _value(resumed, "--load") == str(run) and "--override-opt_param-scheduler" in resumed
    kept = compose("llama", "pretrain", RunSettings(save_path=str(run)),
                   ["--use-checkpoint-opt_param-scheduler"], CPU).train
    assert "--override-opt_param-scheduler" not in kept
    message = schedule_mismatch_message(AssertionError(
        "OptimizerParamScheduler: class input value 200 and checkpointvalue 160 for total "
        "number of iterations do not match"), "/ckpt")
    assert message.startswith("error: --load /ckpt: the checkpoint's learning-rate schedule")
    assert "--override-opt_param-scheduler" in message and "value 200" in message


def test_lora_trains_adapters_on_the_given_checkpoint(tmp_path, monkeypatch):
    monkeypatch.delenv("NPROC_PER_NODE", raising=False)
    settings = RunSettings(output_basepath=str(tmp_path), lora=4, model_size="tiny",
                           pretrain_checkpoint_path="/ckpt/base")
    launch = compose("llama", "finetune", settings, [], CPU)
    cmd = launch.train
    assert _value(cmd, "--lora-rank") == "4"
    assert _value(cmd, "--pretrained-checkpoint") == "/ckpt/base"
    assert "--load" not in cmd and "--finetune" not in cmd  # the first run: nothing to resume
    assert launch.name.endswith("-lora-4")
    (launch.save_dir / "latest_checkpointed_iteration.txt").parent.mkdir(parents=True)
    (launch.save_dir / "latest_checkpointed_iteration.txt").write_text("10")
    again = compose("llama", "finetune", settings, [], CPU).train  # resumes its adapters
    assert _value(again, "--load") == str(launch.save_dir)
    assert _value(again, "--pretrained-checkpoint") == "/ckpt/base"
    with pytest.raises(LaunchError, match="--lora 4 trains adapters on a given model"):
        compose("llama", "finetune", dataclasses.replace(settings, pretrain_checkpoint_path="none",
                                                         output_basepath=str(tmp_path / "b")),
                [], CPU)
