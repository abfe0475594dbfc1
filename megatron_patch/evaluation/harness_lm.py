"""lm-evaluation-harness's ``LM`` interface on a Megatron checkpoint, at any TP/PP.

:class:`MegatronLM` follows lm-eval's Hugging Face backend (``lm_eval.models.huggingface.HFLM``)
request by request, so that scores are comparable with ``lm_eval --model hf``:

* tokenization: ``TemplateLM``'s context/continuation split (the whole text encoded, then cut
  at the context's length; an empty context becomes the BOS token, else EOS), special tokens as
  ``HFLM.tok_encode`` adds them;
* ``loglikelihood``: the last ``max_length + 1`` tokens of context + continuation (truncated
  from the left), the continuation's summed log-probability and whether greedy decoding
  produces it;
* ``loglikelihood_rolling``: ``lm_eval.utils.get_rolling_token_windows`` windows of
  ``max_length`` tokens, each token predicted once;
* ``generate_until``: contexts truncated from the left to ``max_length - max_gen_toks``, greedy
  (or sampled, with ``do_sample``) decoding until an ``until`` string or an end-of-sequence
  token, the text decoded without special tokens and cut at the first stop string.

Requests are ordered and batched by length with lm-eval's ``Collator``. Every rank of the
model-parallel group runs the same requests and gets the same answers (scores are computed on
the last pipeline stage, over the vocabulary split across TP ranks, and broadcast).
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import Any

import jinja2
from lm_eval import utils as lm_utils
from lm_eval.api.instance import Instance
from lm_eval.api.model import TemplateLM
from lm_eval.models.utils import (
    Collator,
    handle_stop_sequences,
    has_bos_prefix,
    normalize_gen_kwargs,
    postprocess_generated_text,
)
from tqdm import tqdm

from megatron_patch.generation.engine import Generator
from megatron_patch.generation.model import InferenceModel
from megatron_patch.generation.perplexity import token_scores
from megatron_patch.generation.sampling import SamplingParams
from megatron_patch.generation.stopping import StopChecker

log = logging.getLogger(__name__)

DEFAULT_MAX_GEN_TOKS = 256  # HFLM.max_gen_toks
# generation keyword arguments honoured besides until / max_gen_toks (and their aliases)
SAMPLING_KWARGS = ("do_sample", "temperature", "top_k", "top_p", "repetition_penalty")

Request = tuple[tuple[str, str] | None, list[int], list[int]]


class MegatronLM(TemplateLM):
    """An lm-eval language model backed by this rank's chunk of a Megatron checkpoint."""

    def __init__(self, loaded: InferenceModel, *, batch_size: int = 1,
                 max_length: int | None = None, seed: int = 1234,
                 progress: bool = True) -> None:
        super().__init__()
        hf_tokenizer = getattr(loaded.tokenizer, "transformers_tokenizer", None)
        if hf_tokenizer is None:
            raise ValueError(f"eval needs a Hugging Face tokenizer (as lm-eval's HF backend "
                             f"uses); the checkpoint's is {type(loaded.tokenizer).__name__}: "
                             "pass --tokenizer-type HFTokenizer --tokenizer-path DIR")
        if batch_size < 1:
            raise ValueError(f"--batch-size must be >= 1, got {batch_size}")
        self.loaded = loaded
        self.tokenizer = hf_tokenizer
        self._batch_size = batch_size
        self._max_length = max_length or loaded.args.max_position_embeddings
        self.seed = seed
        self.progress = progress
        self.generator = Generator(loaded.model, vocab_rows=loaded.vocab_rows,
                                   pad_id=loaded.tokenizer.pad)
        self._truncation_logged = False
        # loglikelihood requests scored and the model sequences that answered them
        self.loglikelihood_counts = {"requests": 0, "sequences": 0}

    # ------------------------------------------------------------------ lm-eval properties

    @property
    def eot_token_id(self) -> int:
        """End of text: the tokenizer's EOS token (as HFLM)."""
        return self.tokenizer.eos_token_id

    @property
    def prefix_token_id(self) -> int:
        """What an empty context is: BOS, else EOS (as HFLM)."""
        bos = self.tokenizer.bos_token_id
        return self.eot_token_id if bos is None else bos

    @property
    def max_length(self) -> int:
        """Tokens of context the model sees (default: ``max_position_embeddings``)."""
        return self._max_length

    @property
    def max_gen_toks(self) -> int:
        """Default number of generated tokens (as HFLM)."""
        return DEFAULT_MAX_GEN_TOKS

    @property
    def batch_size(self) -> int:
        """Requests per forward pass."""
        return self._batch_size

    @property
    def tokenizer_name(self) -> str:
        """The tokenizer's path, as lm-eval names request caches."""
        return self.tokenizer.name_or_path.replace("/", "__")

    # ------------------------------------------------------------------ tokenization

    def tok_encode(self, string: str, add_special_tokens: bool | None = None,
                   left_truncate_len: int | None = None, **kwargs: Any) -> list[int]:
        """Token ids of ``string``: special tokens by the tokenizer's default unless the string
        already starts with the prefix token's text (``HFLM.tok_encode``)."""
        special = {} if add_special_tokens is None else {"add_special_tokens": add_special_tokens}
        if add_special_tokens is None and has_bos_prefix(
                string, self.tokenizer.decode(self.prefix_token_id)):
            special = {"add_special_tokens": False}
        encoding = self.tokenizer.encode(string, **special)
        return encoding[-left_truncate_len:] if left_truncate_len else encoding

    def tok_decode(self, tokens: Sequence[int] | int, skip_special_tokens: bool = True) -> str:
        """Text of ``tokens``."""
        return self.tokenizer.decode(tokens, skip_special_tokens=skip_special_tokens)

    def apply_chat_template(self, chat_history: list[dict[str, str]],
                            add_generation_prompt: bool = True) -> str:
        """The chat rendered by the tokenizer's template (without the system turn if the
        template rejects one), as HFLM renders it."""
        def render(history: list[dict[str, str]]) -> str:
            return self.tokenizer.apply_chat_template(
                history, tokenize=False, add_generation_prompt=add_generation_prompt,
                continue_final_message=not add_generation_prompt)

        try:
            return render(chat_history)
        except jinja2.exceptions.TemplateError:
            log.warning("the chat template failed; retrying without the system turn")
            return render([m for m in chat_history if m["role"] != "system"])

    # ------------------------------------------------------------------ requests

    def loglikelihood(self, requests: list[Instance], disable_tqdm: bool = False
                      ) -> list[tuple[float, bool]]:
        """(log p(continuation | context), is greedy) of each request."""
        return super().loglikelihood(requests, disable_tqdm=disable_tqdm or not self.progress)

    def _loglikelihood_tokens(self, requests: list[Request], disable_tqdm: bool = False,
                              **kwargs: Any) -> list[tuple[float, bool]]:
        """Score token requests, longest first, ``batch_size`` sequences per forward pass.

        Requests with equal context + continuation[:-1] (one-token answers to one question, as
        multiple choice asks) differ only in the last token: one sequence, the group's longest
        continuation, scores them all (lm-eval's logits cache, ``group_by="contexts"``)."""
        def longest_first(group: list[int]):
            tokens = requests[group[0]][1] + requests[group[0]][2]
            return -len(tokens), tuple(tokens)

        shared: dict[tuple[int, ...], list[int]] = {}
        for index, (_, context, continuation) in enumerate(requests):
            shared.setdefault(tuple(context + continuation[:-1]), []).append(index)
        groups = [sorted(group, key=lambda i: -len(requests[i][2])) for group in shared.values()]
        self.loglikelihood_counts["requests"] += len(requests)
        self.loglikelihood_counts["sequences"] += len(groups)
        order = Collator(groups, sort_fn=longest_first)
        answers: list[tuple[float, bool] | None] = [None] * len(requests)
        bar = tqdm(total=len(requests), desc="loglikelihood requests",
                   disable=disable_tqdm or not self.progress)
        for chunk in order.get_batched(n=self.batch_size):
            rows = [self._window(*requests[group[0]][1:]) for group in chunk]
            nll, greedy = (scores.cpu() for scores in token_scores(
                self.loaded.model, rows, vocab_rows=self.loaded.vocab_rows,
                finals=[[requests[i][2][-1] for i in group] for group in chunk]))
            for row, group in enumerate(chunk):
                end = len(rows[row]) - 1
                for variant, index in enumerate(group):
                    request, _, continuation = requests[index]
                    scored = slice(end - len(continuation), end)
                    answers[index] = (-float(nll[variant, row, scored].double().sum()),
                                      bool(greedy[variant, row, scored].all()))
                    if request is not None:
                        self.cache_hook.add_partial("loglikelihood", request, answers[index])
                bar.update(len(group))
        bar.close()
        return answers

    def _window(self, context: list[int], continuation: list[int]) -> list[int]:
        """The last ``max_length + 1`` tokens of context + continuation (inputs + targets)."""
        if not context or not continuation:
            raise ValueError("a loglikelihood request needs context and continuation tokens")
        tokens = context + continuation
        if len(tokens) > self.max_length + 1 and not self._truncation_logged:
            log.warning("context + continuation of %d tokens exceed max_length %d: truncated "
                        "from the left (said once)", len(tokens), self.max_length)
            self._truncation_logged = True
        return tokens[-(self.max_length + 1):]

    def loglikelihood_rolling(self, requests: list[Instance], disable_tqdm: bool = False
                              ) -> list[float]:
        """Log-likelihood of each whole string, in rolling windows of ``max_length`` tokens."""
        windows, counts = [], []
        for (string,) in (request.args for request in requests):
            pieces = [lm_utils.make_disjoint_window(pair)
                      for pair in lm_utils.get_rolling_token_windows(
                          token_list=self.tok_encode(string), prefix_token=self.prefix_token_id,
                          max_seq_len=self.max_length, context_len=1)]
            windows += [(None, context, continuation) for context, continuation in pieces]
            counts.append(len(pieces))
        scores = iter(self._loglikelihood_tokens(windows, disable_tqdm=disable_tqdm))
        totals = []
        for request, count in zip(requests, counts):
            totals.append(sum(next(scores)[0] for _ in range(count)))
            self.cache_hook.add_partial("loglikelihood_rolling", request.args, totals[-1])
        return totals

    def generate_until(self, requests: list[Instance], disable_tqdm: bool = False) -> list[str]:
        """Generate for each (context, generation kwargs) until a stop string, EOS or
        ``max_gen_toks`` tokens."""
        def longest_first(request: tuple[str, dict]):
            return -len(self.tok_encode(request[0])), request[0]

        order = Collator([request.args for request in requests], sort_fn=longest_first,
                         group_by="gen_kwargs", group_fn=lambda request: request[1])
        eos_text = self.tok_decode(self.eot_token_id, skip_special_tokens=False)
        results = []
        bar = tqdm(total=len(requests), desc="generate_until requests",
                   disable=disable_tqdm or not self.progress)
        for chunk in order.get_batched(n=self.batch_size):
            contexts, all_kwargs = zip(*chunk)
            kwargs = normalize_gen_kwargs(all_kwargs[0], self.max_gen_toks)
            until = handle_stop_sequences(kwargs.pop("until", None), eos=eos_text)
            max_gen_toks = kwargs.pop("max_gen_toks")
            params = self._sampling(kwargs)
            prompts = self._prompts(contexts, self.max_length - max_gen_toks)
            stop = StopChecker(self.loaded.tokenizer, self.loaded.eos_ids(), until)
            completions = self.generator.generate_batch(prompts, [max_gen_toks] * len(prompts),
                                                        params, stop)
            for context, completion in zip(contexts, completions):
                text = postprocess_generated_text(self.tok_decode(completion.tokens), until,
                                                  None)
                results.append(text)
                self.cache_hook.add_partial("generate_until", (context, all_kwargs[0]), text)
            bar.update(len(chunk))
        bar.close()
        return order.get_original(results)

    def _prompts(self, contexts: Sequence[str], max_context: int) -> list[list[int]]:
        """Context tokens as ``HFLM.tok_batch_encode`` makes them (no special tokens if the
        first context starts with BOS), each cut to its last ``max_context`` tokens."""
        if max_context < 1:
            raise ValueError(f"max_gen_toks leaves no room for context in max_length "
                             f"{self.max_length}; raise --max-length or lower max_gen_toks")
        special = ({"add_special_tokens": False}
                   if has_bos_prefix(contexts[0], self.tokenizer.bos_token) else {})
        return [self.tokenizer(context, **special).input_ids[-max_context:]
                for context in contexts]

    def _sampling(self, kwargs: dict[str, Any]) -> SamplingParams:
        """Greedy decoding, or sampling when ``do_sample`` is set (seeded by ``--seed``)."""
        unknown = sorted(set(kwargs) - set(SAMPLING_KWARGS))
        if unknown:
            raise ValueError(f"generation kwargs {unknown} are not supported; use "
                             f"until, max_gen_toks and {', '.join(SAMPLING_KWARGS)}")
        if not kwargs.get("do_sample"):
            return SamplingParams(greedy=True)
        return SamplingParams(temperature=float(kwargs.get("temperature", 1.0)),
                              top_k=int(kwargs.get("top_k") or 0),
                              top_p=float(kwargs.get("top_p") or 1.0),
                              repetition_penalty=float(kwargs.get("repetition_penalty", 1.0)),
                              seed=self.seed)

    def get_model_info(self) -> dict[str, Any]:
        """What lm-eval records about the model in its results."""
        args = self.loaded.args
        return {"model_dtype": str(next(self.loaded.model.parameters()).dtype),
                "load": str(args.load), "tensor_model_parallel_size":
                args.tensor_model_parallel_size, "pipeline_model_parallel_size":
                args.pipeline_model_parallel_size, "max_length": self.max_length,
                "loglikelihood_requests": self.loglikelihood_counts["requests"],
                "loglikelihood_sequences": self.loglikelihood_counts["sequences"]}
