"""The hidden-state recipe: how a (prompt, response) pair becomes the SDM head's input h.

h = [mean over positions ; last position] of the LM's final-layer hidden states (after the final norm), over
the chat-templated sequence whose assistant turn is the response truncated right after its right-most
``<verified>`` (SDM_SPEC §1.1). Training and serving both call :func:`embed_texts` with the same
:class:`HiddenStateRecipe`, which the bundle records, so the head sees identical inputs in both.

This module is handed a model and a tokenizer; it never loads one.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import asdict, dataclass, fields

import torch
from tqdm.auto import tqdm

from sdm_core.lm.stops import cut_at_stop

__all__ = [
    "VERIFIED_OPEN",
    "VERIFIED_CLOSE",
    "ChatFormat",
    "HiddenStateRecipe",
    "verification_prefix",
    "served_generation",
    "chat_messages",
    "verification_text",
    "embed_texts",
    "pool_prefixes",
    "pool_states",
    "final_norm",
    "is_sharded",
]

VERIFIED_OPEN = "<verified>"
VERIFIED_CLOSE = "</verified>"


@dataclass(frozen=True)
class ChatFormat:
    """How a prompt becomes chat messages. ``system_prompt`` None leaves the template's own default."""

    system_prompt: str | None = "You are a helpful AI assistant."

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict) -> ChatFormat:
        return cls(**{f.name: data[f.name] for f in fields(cls) if f.name in data})


@dataclass(frozen=True)
class HiddenStateRecipe:
    """Which hidden states make h, recorded in every bundle.

    layer: index into ``hidden_states`` (-1: the final layer, after the final norm).
    sequence_end: "template" (the reference code: the chat template's trailing end-of-turn tokens follow the
        truncated response, so the last position is the template's last token) or "verified" (the paper: the
        sequence ends at the ``<verified>`` token itself). See docs/decisions.md.
    order: "mean_last" ([mean ; last], the reference code) or "last_mean" (the paper's listing order).
    max_length: longest tokenised sequence; longer ones keep their last ``max_length`` tokens, so the end that
        carries the verification tag is never cut.
    """

    layer: int = -1
    sequence_end: str = "template"
    order: str = "mean_last"
    max_length: int = 2048
    verified_open: str = VERIFIED_OPEN

    def __post_init__(self) -> None:
        if self.sequence_end not in ("template", "verified"):
            raise ValueError(f"sequence_end must be 'template' or 'verified', got {self.sequence_end!r}")
        if self.order not in ("mean_last", "last_mean"):
            raise ValueError(f"order must be 'mean_last' or 'last_mean', got {self.order!r}")
        if self.max_length < 8:
            raise ValueError(f"max_length must be >= 8, got {self.max_length}")
        if not self.verified_open:
            raise ValueError("verified_open must be a non-empty string")

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict) -> HiddenStateRecipe:
        return cls(**{f.name: data[f.name] for f in fields(cls) if f.name in data})


def verification_prefix(response: str, verified_open: str = VERIFIED_OPEN) -> str:
    """The response truncated immediately after its right-most ``<verified>``; a response without one gets
    ``"\\n<verified>"`` appended (the reference's malformed-output normaliser, SDM_SPEC §4.1)."""
    cut = response.rfind(verified_open)
    if cut >= 0:
        return response[: cut + len(verified_open)]
    return response.rstrip() + "\n" + verified_open


def served_generation(generation: str, verified_open: str = VERIFIED_OPEN, verified_close: str = VERIFIED_CLOSE) -> str:
    """A free-running generation cut where the server's output ends: through its first verified element.

    The server stops generating at the first ``<verified>`` (an inclusive stop string) and embeds the text up to
    it; :func:`verification_prefix` cuts at the right-most one. A generation that writes several answer/tag pairs
    is therefore cut here first, so that calibration, certification and evaluation embed exactly what serving
    embeds. The model's own closing tag is kept so that correctness functions that pair an answer with its tag
    still see it. A generation without ``<verified>`` is returned whole; one whose first tag never closes is cut
    right after ``<verified>``, as the server cuts it.
    """
    cut = cut_at_stop(generation, stop_inclusive=(verified_open,))
    if cut is None:
        return generation
    close = generation.find(verified_close, len(cut.text))
    nested = generation.find(verified_open, len(cut.text))
    if close < 0 or (0 <= nested < close):
        return cut.text
    return generation[: close + len(verified_close)]


def chat_messages(prompt: str | Sequence[dict], chat: ChatFormat) -> list[dict]:
    """A prompt string (one user turn) or a message list, as chat messages; either gets the chat format's system
    prompt first unless it brings a system turn of its own. A chat of one user turn is thus conditioned exactly as
    the same text given as a string (otherwise the template would add its own default system turn, which the SDM
    head was not calibrated under)."""
    messages = [{"role": "user", "content": prompt}] if isinstance(prompt, str) else [dict(m) for m in prompt]
    if chat.system_prompt is not None and not any(m.get("role") == "system" for m in messages):
        messages.insert(0, {"role": "system", "content": chat.system_prompt})
    return messages


def verification_text(
    tokenizer, prompt: str | Sequence[dict], response: str, chat: ChatFormat, recipe: HiddenStateRecipe
) -> str:
    """The exact string whose hidden states make h for (prompt, response)."""
    prefix = verification_prefix(response, recipe.verified_open)
    messages = chat_messages(prompt, chat) + [{"role": "assistant", "content": prefix}]
    text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=False)
    if recipe.sequence_end == "verified":
        text = text[: text.rfind(recipe.verified_open) + len(recipe.verified_open)]
    return text


def pool_prefixes(
    states: torch.Tensor, lengths: torch.Tensor | Sequence[int], recipe: HiddenStateRecipe
) -> torch.Tensor:
    """h (B, 2H) from final-layer states (B, T, H) whose row i holds its sequence in the first ``lengths[i]``
    positions: the recipe's mean over those positions and the last of them. The one pooling that
    :func:`embed_texts`, :func:`pool_states` and training's b from the training forward all use."""
    device = states.device
    n = torch.as_tensor(lengths, device=device)
    weights = (torch.arange(states.shape[1], device=device).unsqueeze(0) < n.unsqueeze(1)).float().unsqueeze(-1)
    mean = (states * weights).sum(dim=1) / weights.sum(dim=1)
    last = states[torch.arange(states.shape[0], device=device), n - 1]
    pair = (mean, last) if recipe.order == "mean_last" else (last, mean)
    return torch.cat(pair, dim=1)


def pool_states(states: torch.Tensor, recipe: HiddenStateRecipe) -> torch.Tensor:
    """h (2H,) float32 from one sequence's final-layer states (T, H), pooled exactly as :func:`embed_texts` pools.

    For callers that already hold the states of the whole verification sequence (a server that captured them
    while generating); the states must be the recipe's layer after the final norm, one row per token."""
    if states.ndim != 2 or states.shape[0] < 1:
        raise ValueError(f"states must be (T, H) with T >= 1, got shape {tuple(states.shape)}")
    return pool_prefixes(states.float().unsqueeze(0), [states.shape[0]], recipe)[0]


def final_norm(model):
    """The module whose output is the final layer's hidden states after the final norm (what ``embed_texts``
    reads with the default layer), or None when the architecture names it differently."""
    norm = getattr(_backbone(model), "norm", None)
    return norm if isinstance(norm, torch.nn.Module) else None


def is_sharded(model) -> bool:
    """Whether ``model`` is FSDP-sharded (FSDP2 ``fully_shard`` or an FSDP1 wrapper). A sharded model's parameters
    are gathered by its root module's forward hooks, so it must be called as a whole, never through a submodule."""
    try:
        from torch.distributed.fsdp import FSDPModule, FullyShardedDataParallel
    except ImportError:  # torch built without distributed support
        return False
    return isinstance(model, (FSDPModule, FullyShardedDataParallel))


def _backbone(model):
    """The transformer without its LM head: h needs hidden states only, and the vocabulary projection is a large
    share of a small model's compute. Its last hidden state is the final layer after the final norm."""
    if hasattr(model, "get_base_model"):  # peft
        model = model.get_base_model()
    decoder = model.get_decoder() if hasattr(model, "get_decoder") else None
    return decoder if decoder is not None else model


def _keeps_logits(model) -> bool:
    """Whether the (peft-unwrapped) model's forward takes ``logits_to_keep``."""
    import inspect

    inner = model.get_base_model() if hasattr(model, "get_base_model") else model
    try:
        return "logits_to_keep" in inspect.signature(inner.forward).parameters
    except (TypeError, ValueError):
        return False


@torch.no_grad()
def embed_texts(
    model,
    tokenizer,
    texts: Sequence[str],
    recipe: HiddenStateRecipe,
    batch_size: int = 8,
    progress: bool = False,
) -> torch.Tensor:
    """h for each rendered text: (N, 2H) float32. Batched with right padding; mean and last use real tokens only.

    Texts are tokenised without adding special tokens (the chat template already has them) and batched in
    length order to limit padding; the output follows the input order.
    """
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    if not texts:
        hidden = int(model.config.hidden_size)
        return torch.empty(0, 2 * hidden)
    encoded = [tokenizer(t, add_special_tokens=False)["input_ids"][-recipe.max_length :] for t in texts]
    order = sorted(range(len(texts)), key=lambda i: len(encoded[i]))
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    device = next(model.parameters()).device
    sharded = is_sharded(model)
    # A sharded model runs whole (its LM head included) with hidden_states[layer]; HF's hidden_states[-1] is the
    # final norm's output, the decoder's last_hidden_state. Logits for the last position only, when supported.
    backbone = model if sharded else _backbone(model)
    head_kwargs = {"logits_to_keep": 1} if sharded and _keeps_logits(model) else {}
    was_training = model.training
    model.eval()
    out: dict[int, torch.Tensor] = {}  # input position -> h; batches run in length order
    for start in tqdm(range(0, len(order), batch_size), desc="embedding", disable=not progress, leave=False):
        index = order[start : start + batch_size]
        width = max(len(encoded[i]) for i in index)
        ids = torch.full((len(index), width), pad_id, dtype=torch.long)
        mask = torch.zeros((len(index), width), dtype=torch.long)
        for row, i in enumerate(index):
            ids[row, : len(encoded[i])] = torch.tensor(encoded[i])
            mask[row, : len(encoded[i])] = 1
        result = backbone(
            input_ids=ids.to(device),
            attention_mask=mask.to(device),
            output_hidden_states=sharded or recipe.layer != -1,
            use_cache=False,
            **head_kwargs,
        )
        states = (
            result.last_hidden_state if recipe.layer == -1 and not sharded else result.hidden_states[recipe.layer]
        ).float()
        h = pool_prefixes(states, mask.sum(dim=1), recipe).cpu()
        for row, i in enumerate(index):
            out[i] = h[row]
    model.train(was_training)
    return torch.stack([out[i] for i in range(len(texts))])
