"""The LM's own verdict as a score: its probability of the Yes tag token right after ``<verified>``.

A baseline that needs no head: the model was fine-tuned to write Yes or No there, so P(Yes) is its own confidence
that the answer followed the instructions. training.calibrate fits a threshold on it (see
sdm_core.certification.fit_score_threshold) and training.evaluate reports it beside the SDM head.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from sdm_core.lm.embedding import ChatFormat, HiddenStateRecipe, verification_text

__all__ = ["yes_token_id", "tag_probabilities"]


def yes_token_id(tokenizer, yes: str) -> int:
    """The first token of the Yes tag word (the token the model must write first to say Yes)."""
    ids = tokenizer(yes, add_special_tokens=False)["input_ids"]
    if not ids:
        raise ValueError(f"the tokenizer encodes the Yes tag {yes!r} as no tokens")
    return int(ids[0])


@torch.no_grad()
def tag_probabilities(
    model,
    tokenizer,
    prompts: Sequence[object],
    responses: Sequence[str],
    chat: ChatFormat,
    yes: str,
    max_length: int = 2048,
    batch_size: int = 16,
) -> torch.Tensor:
    """P(first Yes token | prompt, response up to and including its right-most ``<verified>``), float32 (N,)."""
    if len(prompts) != len(responses):
        raise ValueError(f"{len(prompts)} prompts but {len(responses)} responses")
    if not prompts:
        return torch.empty(0)
    recipe = HiddenStateRecipe(sequence_end="verified", max_length=max_length)
    token = yes_token_id(tokenizer, yes)
    encoded = [
        tokenizer(verification_text(tokenizer, p, r, chat, recipe), add_special_tokens=False)["input_ids"][-max_length:]
        for p, r in zip(prompts, responses)
    ]
    order = sorted(range(len(encoded)), key=lambda i: len(encoded[i]))
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    out = torch.zeros(len(encoded))
    backbone = model.get_decoder() if hasattr(model, "get_decoder") and model.get_decoder() is not None else model
    head = model.get_output_embeddings()
    for start in range(0, len(order), batch_size):
        index = order[start : start + batch_size]
        width = max(len(encoded[i]) for i in index)
        # Right padding: a causal model's state at a sequence's last real token ignores the padding after it.
        ids = torch.full((len(index), width), pad_id, dtype=torch.long)
        mask = torch.zeros((len(index), width), dtype=torch.long)
        for row, i in enumerate(index):
            ids[row, : len(encoded[i])] = torch.tensor(encoded[i])
            mask[row, : len(encoded[i])] = 1
        states = backbone(input_ids=ids.to(device), attention_mask=mask.to(device), use_cache=False).last_hidden_state
        last = states[torch.arange(len(index), device=states.device), mask.sum(dim=1).to(states.device) - 1]
        probs = torch.softmax(head(last).float(), dim=-1)[:, token].cpu()
        for row, i in enumerate(index):
            out[i] = probs[row]
    model.train(was_training)
    return out
