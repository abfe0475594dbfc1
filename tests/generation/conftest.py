"""Tiny converted checkpoints, Hugging Face references and the torchrun generation worker."""

import json
from pathlib import Path

import pytest
import torch

from tests.launch import run_module

PROMPT_LENGTHS = (5, 9, 3, 12)  # batches of 3: the first one left-padded
MAX_NEW_TOKENS = 12
SEQ_LENGTH = 16  # perplexity windows


def prompts() -> list[list[int]]:
    """Random token prompts (ids below the tiny tokenizer's 240)."""
    generator = torch.Generator().manual_seed(0)
    return [torch.randint(3, 240, (n,), generator=generator).tolist() for n in PROMPT_LENGTHS]


def windows() -> list[list[int]]:
    """Perplexity windows of three random documents (40, 7 and 2 tokens)."""
    generator = torch.Generator().manual_seed(1)
    documents = [torch.randint(0, 240, (n,), generator=generator).tolist() for n in (40, 7, 2)]
    return [d[s:s + SEQ_LENGTH + 1] for d in documents for s in range(0, len(d) - 1, SEQ_LENGTH)]


@pytest.fixture(scope="session")
def tiny_checkpoint(tmp_path_factory):
    """``case -> (HF directory, converted Megatron checkpoint)``, each built once."""
    from megatron_patch.conversion import convert_hf_to_mcore
    from tests.conversion.tiny_models import save_tiny_model, save_tokenizer

    built = {}

    def build(case: str) -> tuple[Path, Path]:
        if case not in built:
            root = tmp_path_factory.mktemp(f"generation-{case}")
            hf = save_tiny_model(case, root / "hf")
            save_tokenizer(hf, 240)
            built[case] = (hf, convert_hf_to_mcore(hf, root / "mcore", progress=False))
        return built[case]

    return build


class Reference:
    """Hugging Face results on the original weights (fp32, CPU), each computed once."""

    def __init__(self, tiny_checkpoint):
        self.tiny_checkpoint = tiny_checkpoint
        self.cache = {}

    def model(self, case: str):
        if (case, "model") not in self.cache:
            from transformers import AutoModelForCausalLM

            hf = self.tiny_checkpoint(case)[0]
            self.cache[case, "model"] = AutoModelForCausalLM.from_pretrained(
                hf, dtype=torch.float32).eval()
        return self.cache[case, "model"]

    def generate(self, case: str, eos: int | None) -> list[list[int]]:
        """Greedy ``generate`` of every prompt on its own, stopping at ``eos`` if given."""
        if (case, eos) not in self.cache:
            outputs = []
            for prompt in prompts():
                with torch.no_grad():
                    out = self.model(case).generate(
                        torch.tensor([prompt]), max_new_tokens=MAX_NEW_TOKENS, do_sample=False,
                        eos_token_id=eos, pad_token_id=0)
                outputs.append(out[0, len(prompt):].tolist())
            self.cache[case, eos] = outputs
        return self.cache[case, eos]

    def nll(self, case: str) -> tuple[float, int]:
        """Summed NLL and token count of the windows."""
        if (case, "nll") not in self.cache:
            total, count = 0.0, 0
            for window in windows():
                tokens = torch.tensor([window])
                with torch.no_grad():
                    logprobs = self.model(case)(tokens[:, :-1]).logits.log_softmax(-1)
                total -= logprobs[0].gather(-1, tokens[0, 1:, None]).sum().item()
                count += len(window) - 1
            self.cache[case, "nll"] = total, count
        return self.cache[case, "nll"]


@pytest.fixture(scope="session")
def hf_reference(tiny_checkpoint) -> Reference:
    return Reference(tiny_checkpoint)


def run_generation_worker(runs: list[dict], tmp: Path, nproc: int) -> dict[str, dict]:
    """Run ``generation_worker`` on ``runs`` under torchrun; ``{run id: results}``."""
    spec = {"prompts": prompts(), "windows": windows(), "max_new_tokens": MAX_NEW_TOKENS,
            "runs": runs}
    (tmp / "spec.json").write_text(json.dumps(spec))
    run_module("tests.generation.generation_worker", [str(tmp / "spec.json"),
                                                      str(tmp / "out.json")], nproc=nproc)
    return json.loads((tmp / "out.json").read_text())
