"""The Pai-style launcher: positional settings, validation before launch, composed commands."""

import pytest

from megatron_patch.launch.command import SHIPPED_CHAT, compose
from megatron_patch.launch.settings import POSITIONAL, LaunchError, RunSettings, parse_positional
from megatron_patch.runtime.backends import Backends

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
    (dict(cp=2), "needs Transformer Engine"),
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
     "10 warm-up iterations, not fewer than the 10 training iterations"),
])
def test_finetune_and_schedule_checks(mode, settings, message, monkeypatch):
    monkeypatch.delenv("NPROC_PER_NODE", raising=False)
    with pytest.raises(LaunchError, match=message):
        compose("llama", mode, RunSettings(**settings), [], CPU)
