"""Batched greedy generation for hard negatives, calibration and evaluation (left padding, no sampling), and the
labelling of generations by the task's correctness function."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
from tqdm.auto import tqdm

from sdm_core.lm.embedding import ChatFormat, served_generation
from training.encoding import generation_prompt
from training.records import Record

__all__ = ["greedy_generate", "LabelledGenerations", "label_generations", "decode_and_label"]


@torch.no_grad()
def greedy_generate(
    model,
    tokenizer,
    prompts: Sequence[str | Sequence[dict]],
    chat: ChatFormat,
    max_new_tokens: int,
    batch_size: int = 16,
    progress: bool = False,
    desc: str = "generating",
    synced: bool = False,
) -> list[str]:
    """Greedy completions (special tokens skipped), in input order. Stops at the tokenizer's EOS.

    ``synced`` (a sharded model: every forward is collective): every rank must call this, with its own prompts or
    none; ranks run the same number of batches (a rank short of batches decodes a one-token filler) and the same
    number of decoding steps (``synced_gpus``), so no rank waits on a forward the others never make.
    """
    if not prompts and not synced:
        return []
    texts = [generation_prompt(tokenizer, p, chat) for p in prompts]
    encoded = [tokenizer(t, add_special_tokens=False)["input_ids"] for t in texts]
    order = sorted(range(len(texts)), key=lambda i: len(encoded[i]))
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    out: list[str] = [""] * len(texts)
    batches = [order[start : start + batch_size] for start in range(0, len(order), batch_size)]
    fillers = 0
    if synced:
        count = torch.tensor([len(batches)], device=device)
        torch.distributed.all_reduce(count, op=torch.distributed.ReduceOp.MAX)
        fillers = int(count.item()) - len(batches)
    extra = {"synced_gpus": True} if synced else {}
    for index in tqdm(batches, desc=desc, disable=not progress, leave=False):
        width = max(len(encoded[i]) for i in index)
        ids = torch.full((len(index), width), pad_id, dtype=torch.long)
        mask = torch.zeros((len(index), width), dtype=torch.long)
        for row, i in enumerate(index):
            n = len(encoded[i])
            ids[row, width - n :] = torch.tensor(encoded[i])
            mask[row, width - n :] = 1
        generated = model.generate(
            input_ids=ids.to(device),
            attention_mask=mask.to(device),
            max_new_tokens=max_new_tokens,
            do_sample=False,
            eos_token_id=tokenizer.eos_token_id,
            pad_token_id=pad_id,
            **extra,
        )
        for row, i in enumerate(index):
            out[i] = tokenizer.decode(generated[row, width:], skip_special_tokens=True)
    for _ in range(fillers):  # output discarded; only the collective forwards matter
        filler = torch.full((1, 1), pad_id, dtype=torch.long, device=device)
        model.generate(
            input_ids=filler,
            attention_mask=torch.ones_like(filler),
            max_new_tokens=max_new_tokens,
            do_sample=False,
            eos_token_id=tokenizer.eos_token_id,
            pad_token_id=pad_id,
            **extra,
        )
    model.train(was_training)
    return out


@dataclass(frozen=True)
class LabelledGenerations:
    """Each record's greedy generation and its label y = r(generation, reference), in record order."""

    texts: list[str]
    labels: list[int]

    @property
    def accuracy(self) -> float:
        return sum(self.labels) / len(self.labels) if self.labels else 0.0


def label_generations(
    records: Sequence[Record], texts: Sequence[str], correct: Callable[[str, str], bool]
) -> LabelledGenerations:
    """Label generations with the task's correctness function, against each record's reference (or positive).

    Each generation is first cut where the server's output would end (:func:`served_generation`), so the label
    and the head's input describe the answer a user is served, not text the server never generates."""
    if len(records) != len(texts):
        raise ValueError(f"{len(records)} records but {len(texts)} generations")
    texts = [served_generation(text) for text in texts]
    labels = [int(bool(correct(text, record.reference or record.positive))) for record, text in zip(records, texts)]
    return LabelledGenerations(list(texts), labels)


def decode_and_label(
    model,
    tokenizer,
    records: Sequence[Record],
    chat: ChatFormat,
    correct: Callable[[str, str], bool],
    max_new_tokens: int,
    batch_size: int = 16,
    progress: bool = False,
    desc: str = "generating",
) -> LabelledGenerations:
    """What calibration, certification and evaluation all do to a record file: greedy-decode every prompt with
    the model as served, then label each generation with r. One function, so the head is calibrated and checked
    on exactly the kind of generation it is later scored on."""
    prompts = [r.prompt if r.prompt is not None else [dict(m) for m in r.messages] for r in records]
    texts = greedy_generate(model, tokenizer, prompts, chat, max_new_tokens, batch_size, progress, desc)
    return label_generations(records, texts, correct)
