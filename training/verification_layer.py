"""The SDM layers used inside fine-tuning (SDM_SPEC §3.5): one instance per document, embedded with the frozen
LM, split into the layer's support (flag 1) and calibration (flag 0) halves, fitted with sdm_core."""

from __future__ import annotations

import random
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import torch

from sdm_core import SDMConfig, SDMEstimator
from sdm_core.lm.embedding import ChatFormat, HiddenStateRecipe, embed_texts, pool_prefixes, verification_text
from training.records import Record

__all__ = [
    "Instance",
    "split_flags",
    "negative_candidates",
    "draw_layer_instances",
    "embed_instances",
    "fit_verification_layer",
    "CLASS_NAMES",
    "PAPER_SPLIT_SEED",
    "PAPER_INSTANCE_SEED",
    "shared_prefix_lengths",
    "prefix_embeddings",
    "refit_due",
]

CLASS_NAMES = ("No", "Yes")

# The reference code's seeds for the final test-time layer (SDM_SPEC §3.7): Random(23) splits the calibration
# documents into its support and calibration halves, Random(46 + 7) draws each document's instance.
PAPER_SPLIT_SEED = 23
PAPER_INSTANCE_SEED = 53


@dataclass(frozen=True)
class Instance:
    """One (prompt, response) with its reward label: 1 = the instruction was followed (positive), 0 = not."""

    doc_id: str
    prompt: object
    response: str
    label: int


def split_flags(doc_ids: Sequence[str], seed: int, epoch: int) -> dict[str, bool]:
    """flag True: the document is in the layer's support (its training split), with probability 0.5."""
    rng = random.Random(f"{seed}:split:{epoch}")
    return {doc_id: rng.random() < 0.5 for doc_id in doc_ids}


def prompt_of(record: Record) -> object:
    return record.prompt if record.prompt is not None else record.messages


def negative_candidates(record: Record, hard_negatives: Sequence[str] = ()) -> list[str]:
    """The negatives a document's draw picks from: its static negative, then its stored hard negatives."""
    return [record.negative] + list(hard_negatives)


def draw_layer_instances(
    records: Sequence[Record],
    hard_negatives: Mapping[str, Sequence[str]],
    rng: random.Random,
    gamma_positive: float = 0.5,
    prefer_hard_negatives: bool = False,
) -> list[Instance]:
    """One instance per document: the positive with probability gamma_positive, else a negative drawn uniformly
    from the static negative and the document's stored hard negatives. With ``prefer_hard_negatives`` (the
    final test-time layer's gamma_diversity = 1) the static negative is used only when no hard negative exists."""
    out = []
    for record in records:
        if rng.random() < gamma_positive:
            out.append(Instance(record.id, prompt_of(record), record.positive, 1))
            continue
        stored = list(hard_negatives.get(record.id, ()))
        candidates = stored if (prefer_hard_negatives and stored) else negative_candidates(record, stored)
        out.append(Instance(record.id, prompt_of(record), rng.choice(candidates), 0))
    return out


def embed_instances(
    model,
    tokenizer,
    instances: Sequence[Instance],
    chat: ChatFormat,
    recipe: HiddenStateRecipe,
    batch_size: int,
    progress: bool = False,
) -> torch.Tensor:
    texts = [verification_text(tokenizer, i.prompt, i.response, chat, recipe) for i in instances]
    return embed_texts(model, tokenizer, texts, recipe, batch_size=batch_size, progress=progress)


def shared_prefix_lengths(
    tokenizer,
    instances: Sequence[Instance],
    input_ids: Sequence[Sequence[int]],
    chat: ChatFormat,
    recipe: HiddenStateRecipe,
) -> list[int] | None:
    """Token counts of the instances' verification texts when each is a prefix of its training sequence, else None.

    With the recipe ending at ``<verified>`` (sequence_end "verified", final layer) the verification text is a
    prefix of the training text, and a causal LM's hidden states over a prefix do not depend on what follows:
    the training forward pass then yields h (:func:`prefix_embeddings`), with no second pass. Token ids are
    compared, so a tokenisation that merges across the boundary falls back to the separate pass (None).
    """
    if recipe.sequence_end != "verified" or recipe.layer != -1:
        return None
    lengths = []
    for instance, ids_full in zip(instances, input_ids):
        text = verification_text(tokenizer, instance.prompt, instance.response, chat, recipe)
        ids = tokenizer(text, add_special_tokens=False)["input_ids"]
        if not ids or len(ids) > recipe.max_length or list(ids_full[: len(ids)]) != ids:
            return None
        lengths.append(len(ids))
    return lengths


def prefix_embeddings(final_states: torch.Tensor, lengths: Sequence[int], recipe: HiddenStateRecipe) -> torch.Tensor:
    """h of the recipe ([mean; last] of the final layer) over the first ``lengths[i]`` tokens of row i: (B, 2H) on
    CPU."""
    return pool_prefixes(final_states.detach().float(), list(lengths), recipe).cpu()


def fit_verification_layer(
    embeddings: torch.Tensor,
    instances: Sequence[Instance],
    flags: Mapping[str, bool],
    sdm_config: SDMConfig,
) -> SDMEstimator:
    """Fit a 2-class SDM layer: support = instances whose document has flag True, calibration = the rest."""
    support = [k for k, i in enumerate(instances) if flags[i.doc_id]]
    calibration = [k for k, i in enumerate(instances) if not flags[i.doc_id]]
    if len(support) < 2 or not calibration:
        raise ValueError(
            f"the SDM layer needs at least 2 support and 1 calibration documents, got {len(support)} and "
            f"{len(calibration)}; use more documents"
        )
    labels = torch.tensor([i.label for i in instances], dtype=torch.long)
    s, c = torch.tensor(support), torch.tensor(calibration)
    return SDMEstimator(sdm_config).fit(
        embeddings[s],
        labels[s],
        embeddings[c],
        labels[c],
        num_classes=2,
        train_ids=[instances[k].doc_id for k in support],
        calibration_ids=[instances[k].doc_id for k in calibration],
    )


def refit_due(local_step: int, every: int) -> bool:
    """Whether the training layer is refitted before an epoch's 0-based step ``local_step``: every ``every`` steps
    after the epoch-start fit (``every`` 0: never, the paper's once-per-epoch fit)."""
    return every > 0 and local_step > 0 and local_step % every == 0
