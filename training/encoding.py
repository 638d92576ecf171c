"""CONTRASTIVE-MASKING encoding with loss masks from token offsets (SDM_SPEC §3.2; §7 item 14).

A positive trains on its whole completion (everything after the generation prompt, template end tokens
included). A negative trains only from its final ``<verified>No</verified>`` onwards. The boundary is a
character position in the rendered chat text; a token is trained when it ends after the boundary. Nothing is
re-tokenised separately, so the cut is exact at token level for any chat template.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

from sdm_core.lm.embedding import ChatFormat, chat_messages

__all__ = ["IGNORE_INDEX", "EncodedInstance", "encode_instance", "collate", "generation_prompt"]

IGNORE_INDEX = -100
NO_TAG = "<verified>No</verified>"


@dataclass(frozen=True)
class EncodedInstance:
    input_ids: list[int]
    labels: list[int]  # IGNORE_INDEX where the loss is masked

    @property
    def trained_tokens(self) -> int:
        return sum(1 for t in self.labels[1:] if t != IGNORE_INDEX)


def generation_prompt(tokenizer, prompt: str | Sequence[dict], chat: ChatFormat) -> str:
    """The rendered prompt up to and including the assistant turn's opening (what generation continues)."""
    return tokenizer.apply_chat_template(chat_messages(prompt, chat), tokenize=False, add_generation_prompt=True)


def encode_instance(
    tokenizer, prompt: str | Sequence[dict], response: str, label: int, chat: ChatFormat, max_length: int = 2048
) -> EncodedInstance:
    """Token ids and masked labels for one (prompt, response) with reward label 1 (positive) or 0 (negative)."""
    messages = chat_messages(prompt, chat)
    prompt_text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    full_text = tokenizer.apply_chat_template(
        messages + [{"role": "assistant", "content": response}], tokenize=False, add_generation_prompt=False
    )
    if full_text.startswith(prompt_text):
        start = len(prompt_text)
    else:  # templates that render the assistant turn differently: anchor on the response text itself
        start = full_text.rfind(response)
        if start < 0:
            raise ValueError("the chat template does not reproduce the response text; cannot place the loss mask")
    if label == 1:
        boundary = start
    elif label == 0:
        boundary = full_text.rfind(NO_TAG)
        if boundary < start:
            raise ValueError(f"a negative response must contain {NO_TAG!r}; got {response[-60:]!r}")
    else:
        raise ValueError(f"label must be 0 or 1, got {label!r}")
    enc = tokenizer(full_text, add_special_tokens=False, return_offsets_mapping=True)
    ids = list(enc["input_ids"])
    labels = [tok if end > boundary else IGNORE_INDEX for tok, (_, end) in zip(ids, enc["offset_mapping"])]
    if len(ids) > max_length:  # keep the end: it holds the completion and the verification tag
        ids, labels = ids[-max_length:], labels[-max_length:]
    return EncodedInstance(ids, labels)


def collate(instances: Sequence[EncodedInstance], pad_id: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Right-padded (input_ids, attention_mask, labels)."""
    width = max(len(i.input_ids) for i in instances)
    ids = torch.full((len(instances), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(instances), width), dtype=torch.long)
    labels = torch.full((len(instances), width), IGNORE_INDEX, dtype=torch.long)
    for row, inst in enumerate(instances):
        n = len(inst.input_ids)
        ids[row, :n] = torch.tensor(inst.input_ids)
        mask[row, :n] = 1
        labels[row, :n] = torch.tensor(inst.labels)
    return ids, mask, labels
