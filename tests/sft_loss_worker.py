"""torchrun worker: the finetune loss and gradient equal the global masked mean, computed by hand.

``python -m torch.distributed.run ... -m tests.sft_loss_worker OUT [finetune flags]`` builds the
model and SFT data as ``finetune`` does and, for the first global batch (every micro-batch of
every data-parallel rank), computes by hand: logits -> cross entropy -> the mean over all
assistant tokens and its gradient, and the mean of the per-sequence means. It then runs the real
training iteration (per-token) and an evaluation (per-sequence) and writes to OUT the logged
losses beside the hand-computed ones, and the largest gradient difference (run with
``--clip-grad 0`` so that the gradient buffers keep the unclipped gradient).
"""

import json
import sys
from pathlib import Path

import torch
import torch.nn.functional as F
from megatron.core import parallel_state
from megatron.core.num_microbatches_calculator import get_num_microbatches

from megatron_patch.training.finetune import forward_step_for, parse_finetune_args
from megatron_patch.training.initialize import initialize
from megatron_patch.training.loop import evaluate, setup_model_and_optimizer, train
from megatron_patch.training.pretrain import build_run_tokenizer, set_padded_vocab
from megatron_patch.training.pretrain_data import data_iterator, train_valid_test_num_samples
from megatron_patch.training.sft_data import build_sft_datasets, packed_batch


def _all_reduce(tensor: torch.Tensor) -> torch.Tensor:
    torch.distributed.all_reduce(tensor, group=parallel_state.get_data_parallel_group())
    return tensor


def _micro_batches(dataset, args) -> list[dict]:
    """This rank's micro-batches of the first global batch."""
    iterator = data_iterator(dataset, args, 0)
    return [next(iterator) for _ in range(get_num_microbatches())]


def _token_losses(model, rows: dict, args) -> torch.Tensor:
    """Cross entropy of every position of ``rows``, [rows, seq_length], from the logits."""
    flat, params = packed_batch(dict(rows), args.seq_length)
    logits = model(flat["tokens"], flat["position_ids"], None, packed_seq_params=params)
    return F.cross_entropy(logits.reshape(-1, logits.shape[-1]).double(),
                           flat["labels"].reshape(-1), reduction="none").view(rows["tokens"].shape)


def per_token_mean_and_grads(model, batches: list[dict], args) -> tuple[float, list]:
    """Global masked-token mean loss and its gradient (summed over data-parallel ranks)."""
    model.zero_grad_buffer()
    count = _all_reduce(sum(rows["loss_mask"].double().sum() for rows in batches))
    with model.no_sync():
        total = sum((_token_losses(model, rows, args) * rows["loss_mask"]).sum()
                    for rows in batches)
        (total / count).backward()
    grads = [_all_reduce(param.main_grad.clone()) for param in model.parameters()]
    return (_all_reduce(total.detach()) / count).item(), grads


@torch.no_grad()
def per_sequence_mean(model, batches: list[dict], args) -> float:
    """Global mean of each sample's mean loss over its assistant tokens."""
    means = []
    for rows in batches:
        losses = _token_losses(model, rows, args)
        seq = args.seq_length
        for row in range(losses.shape[0]):
            bounds = [b for b in rows["cu_seqlens"][row].tolist() if b < seq] + [seq]
            mask = rows["loss_mask"][row].double()
            means += [(losses[row, a:b] * mask[a:b]).sum() / mask[a:b].sum()
                      for a, b in zip(bounds[:-1], bounds[1:]) if mask[a:b].any()]
    totals = _all_reduce(torch.stack([sum(means), torch.tensor(float(len(means)))]))
    return (totals[0] / totals[1]).item()


def main(out: str, argv: list[str]) -> None:
    args = parse_finetune_args(argv)
    initialize(args)
    tokenizer = build_run_tokenizer(args)
    set_padded_vocab(args, tokenizer)
    state = setup_model_and_optimizer(args)
    model = state.model[0]
    train_ds, _, _ = build_sft_datasets(args, tokenizer, train_valid_test_num_samples(args))
    batches = _micro_batches(train_ds, args)
    per_token, reference_grads = per_token_mean_and_grads(model, batches, args)
    logged = train(state, [data_iterator(train_ds, args, 0)], None, forward_step_for(args), args)
    grad_diff = max((param.main_grad - grad).abs().max().item()
                    for param, grad in zip(model.parameters(), reference_grads))
    grad_scale = max(grad.abs().max().item() for grad in reference_grads)
    per_sequence = per_sequence_mean(model, batches, args)
    args.sft_loss_average, args.eval_iters = "per-sequence", 1
    reported = evaluate(state, [data_iterator(train_ds, args, 0)], forward_step_for(args), args)
    if torch.distributed.get_rank() == torch.distributed.get_world_size() - 1:
        Path(out).write_text(json.dumps({
            "per_token": [logged["lm loss"], per_token],
            "per_sequence": [reported["lm loss"], per_sequence],
            "grad": [grad_diff, grad_scale]}))


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2:])
