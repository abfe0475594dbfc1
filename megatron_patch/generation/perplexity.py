"""Perplexity of a Megatron checkpoint on held-out documents: ``exp(mean next-token NLL)``.

Documents come from a Megatron indexed dataset (``PREFIX.bin``/``.idx``) or from JSONL, parquet
or text files tokenized exactly as ``megatron-patch preprocess`` does. Each document is cut into
windows of ``seq_length + 1`` tokens that overlap by one, so every token after a document's
first is predicted once, with the context of its window. The NLL is taken over the real
vocabulary (the embedding's padding rows are excluded), as Hugging Face computes it, with
Megatron's vocab-parallel cross entropy at any TP/PP.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import torch
from megatron.core import parallel_state
from megatron.core.pipeline_parallel import get_forward_backward_func
from tqdm import tqdm

from megatron_patch.data.bad_records import BadRecords, DataError


def load_documents(path: str | Path, tokenizer, *, json_key: str = "text",
                   append_eod: bool = False, on_error: str = "fail",
                   report=None) -> list[list[int]]:
    """Token ids of every document of an indexed dataset prefix or of raw input files."""
    prefix = str(path)
    if Path(prefix + ".bin").is_file() and Path(prefix + ".idx").is_file():
        from megatron.core.datasets.indexed_dataset import IndexedDataset

        dataset = IndexedDataset(prefix)
        return [dataset[i].tolist() for i in range(len(dataset))]
    from megatron_patch.data.encoder import Encoder, RecordError
    from megatron_patch.data.readers import input_files, read_records

    encoder = Encoder(tokenizer, (json_key,), append_eod=append_eod)
    bad = BadRecords("eval-ppl", on_error, **({"write": report} if report else {}))
    documents = []
    for location, kind, payload in read_records(input_files(path), [json_key]):
        try:
            encoded = encoder.encode(kind, payload)
        except RecordError as error:
            bad.add(location, str(error))
            continue
        if encoded is not None:
            documents.append(encoded[json_key][0])
    bad.finish()
    return documents


def windows(documents: Sequence[Sequence[int]], seq_length: int) -> list[list[int]]:
    """Windows of at most ``seq_length + 1`` tokens (inputs + next tokens), one token overlap."""
    cut = []
    for document in documents:
        for start in range(0, max(len(document) - 1, 0), seq_length):
            cut.append(list(document[start:start + seq_length + 1]))
    return cut


def _token_scores(labels: torch.Tensor, vocab_rows: int):
    """GPTModel ``output_processor``: [2, seq, batch, variants] of each label's NLL over the real
    vocabulary and whether it is the arg-max token (1.0) or not (0.0); ``labels`` is
    [seq, batch, variants]."""
    def processor(*, hidden_states, output_layer, output_weight, scale_logits, **_):
        logits, _ = output_layer(hidden_states, weight=output_weight,
                                 runtime_gather_output=False)
        logits = scale_logits(logits).float()  # [seq, batch, vocab / tp]
        shard = logits.shape[-1]
        start = parallel_state.get_tensor_model_parallel_rank() * shard
        padding = torch.arange(start, start + shard, device=logits.device) >= vocab_rows
        logits = logits.masked_fill(padding, float("-inf"))
        local = (labels >= start) & (labels < start + shard)
        label_logit = torch.where(local, logits.gather(-1, (labels - start).clamp(0, shard - 1)),
                                  float("-inf"))
        top = logits.max(-1, keepdim=True).values
        group = parallel_state.get_tensor_model_parallel_group()
        for value in (label_logit, top):
            torch.distributed.all_reduce(value, torch.distributed.ReduceOp.MAX, group=group)
        # log of the softmax's denominator over the vocabulary split across TP ranks, in place
        total = logits.sub_(top).exp_().sum(-1, keepdim=True)
        torch.distributed.all_reduce(total, group=group)
        nll = top + total.log() - label_logit
        return torch.stack([nll, (label_logit >= top).float()])
    return processor


def _identity(output: torch.Tensor, non_loss_data: bool = False) -> torch.Tensor:
    return output


def token_scores(model: torch.nn.Module, rows: Sequence[Sequence[int]], *, vocab_rows: int,
                 finals: Sequence[Sequence[int]] | None = None
                 ) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-token (NLL, is-arg-max) [variants, batch, longest - 1] of each row's tokens 1.. given
    the tokens before them (rows are right-padded, so positions past a row's end are garbage);
    the same on every rank of the model-parallel group.

    Variant ``j`` scores row ``b`` with its last token replaced by ``finals[b][j]`` (rows with
    fewer finals repeat their first), all from one forward pass; without ``finals`` there is
    one variant, the rows as given."""
    device = next(model.parameters()).device
    length = max(len(r) for r in rows) - 1
    data = torch.tensor([list(r) + [0] * (length + 1 - len(r)) for r in rows], dtype=torch.long)
    finals = finals or [[r[-1]] for r in rows]
    if len(finals) != len(rows) or not all(finals):
        raise ValueError("token_scores: finals needs at least one token for every row")
    variants = max(len(f) for f in finals)
    labels = data[:, 1:, None].repeat(1, 1, variants)  # [batch, seq, variants]
    for row, (tokens, final) in enumerate(zip(rows, finals)):
        labels[row, len(tokens) - 2] = torch.tensor(
            list(final) + [final[0]] * (variants - len(final)))
    data, labels = data.to(device), labels.to(device)

    def step(data_iterator, chunk):
        tokens, targets = next(data_iterator)
        positions = torch.arange(tokens.shape[1], device=device)[None].expand_as(tokens)
        return (chunk(tokens, positions, None,
                      output_processor=_token_scores(targets, vocab_rows)), _identity)

    model.eval()
    with torch.no_grad():
        outputs = get_forward_backward_func()(
            forward_step_func=step,
            data_iterator=iter([(data[:, :-1], labels.transpose(0, 1).contiguous())]),
            model=[model], num_microbatches=1, seq_length=length,
            micro_batch_size=len(rows), forward_only=True, collect_non_loss_data=True)
    if parallel_state.is_pipeline_last_stage(ignore_virtual=True):
        scores = outputs[0].permute(0, 3, 2, 1).contiguous()  # [2, variants, batch, seq]
    else:
        scores = torch.empty(2, variants, len(rows), length, dtype=torch.float32, device=device)
    if parallel_state.get_pipeline_model_parallel_world_size() > 1:
        torch.distributed.broadcast(scores, parallel_state.get_pipeline_model_parallel_last_rank(),
                                    group=parallel_state.get_pipeline_model_parallel_group())
    return scores[0], scores[1].bool()


def negative_log_likelihood(model: torch.nn.Module, token_windows: Sequence[Sequence[int]], *,
                            vocab_rows: int, batch_size: int) -> tuple[float, int]:
    """(summed NLL, predicted tokens) over ``token_windows``, the same on every rank."""
    total = torch.zeros(2, dtype=torch.float64)
    rank0 = not torch.distributed.is_initialized() or torch.distributed.get_rank() == 0
    progress = tqdm(total=len(token_windows), desc="eval-ppl", unit="window", disable=not rank0)
    for start in range(0, len(token_windows), batch_size):
        batch = token_windows[start:start + batch_size]
        progress.update(len(batch))
        nll = token_scores(model, batch, vocab_rows=vocab_rows)[0][0]
        counted = torch.tensor([[i < len(w) - 1 for i in range(nll.shape[1])] for w in batch],
                               device=nll.device)
        total += torch.stack([nll[counted].double().sum(), counted.sum().double()]).cpu()
    progress.close()
    if total[1] == 0:
        raise DataError("no tokens to evaluate: every document has fewer than two tokens")
    return float(total[0]), int(total[1])
