"""Word-ordering task: turn one sentence into one Record (spec §3.2, §4.4, §5).

The sentence is split on whitespace (punctuation stays attached to its word). The last
``suffix_size`` tokens are shuffled into the prompt's "multiset"; the model must restore
the sentence. A second, different shuffle gives the static negative.
"""

from __future__ import annotations

import math
import random
from collections import Counter
from collections.abc import Sequence

from training.records import NO_TAG, YES_TAG, Record

# Exact prompt of §4.4 (ASCII single quotes; the optional hint suffix is always empty).
PROMPT_TEMPLATE = (
    "Complete the sentence '{prefix}' by reordering all of the following without adding "
    "new punctuation nor words: '{multiset}'. Only reply with the sentence in the XML "
    "<sentence> </sentence> followed by <verified>Yes</verified> if your answer correctly "
    "addressed the instructions, and <verified>No</verified> if it did not."
)

# Ways a static negative may lose its sentence tags (§5); "none" keeps both.
TAG_DROPS = ("open", "close", "both")


def format_prompt(prefix: str, multiset: str) -> str:
    """The §4.4 user prompt for a prefix and a shuffled suffix."""
    return PROMPT_TEMPLATE.format(prefix=prefix, multiset=multiset)


def format_positive(sentence: str) -> str:
    """Static positive s+: the sentence in tags followed by the Yes tag."""
    return f"<sentence>{sentence}</sentence>\n{YES_TAG}"


def format_negative(sentence: str, drop: str = "none") -> str:
    """Static negative s-, optionally with the opening, closing or both sentence tags dropped."""
    if drop == "none":
        return f"<sentence>{sentence}</sentence>\n{NO_TAG}"
    if drop == "open":
        return f"{sentence}</sentence>\n{NO_TAG}"
    if drop == "close":
        return f"<sentence>{sentence}\n{NO_TAG}"
    if drop == "both":
        return f"{sentence}\n{NO_TAG}"
    raise ValueError(f"unknown tag drop {drop!r}; use 'none' or one of {TAG_DROPS}")


def distinct_orderings(tokens: Sequence[str]) -> int:
    """How many different sequences the tokens can be arranged into (multiset permutations)."""
    total = math.factorial(len(tokens))
    for count in Counter(tokens).values():
        total //= math.factorial(count)
    return total


def two_distinct_shuffles(
    tokens: Sequence[str], rng: random.Random, attempts: int
) -> tuple[list[str], list[str]] | None:
    """Two shuffles of ``tokens`` that differ from the original order and from each other.

    Rejection sampling: up to ``attempts`` draws for the first shuffle, then up to
    ``attempts`` more for the second. Returns None if either runs out.
    """
    original = list(tokens)
    first: list[str] | None = None
    for _ in range(attempts):
        candidate = original[:]
        rng.shuffle(candidate)
        if candidate != original:
            first = candidate
            break
    if first is None:
        return None
    for _ in range(attempts):
        candidate = original[:]
        rng.shuffle(candidate)
        if candidate != original and candidate != first:
            return first, candidate
    return None


def make_record(
    sentence: str,
    rng: random.Random,
    *,
    record_id: str,
    source: str,
    suffix_size: int = 3,
    attempts: int = 50,
    tag_drop_prob: float = 0.1,
    check_variety: bool = True,
    extra_meta: dict | None = None,
) -> Record | None:
    """One word-ordering Record for ``sentence``, or None if it cannot be built.

    None means: fewer tokens than ``suffix_size``; with ``check_variety``, the suffix has
    fewer than 2 distinct words (the paper's skip rule); or rejection sampling found no two
    distinct shuffles in ``attempts`` draws each. Random draws happen in a fixed order
    (shuffles, then the tag-drop decision), so a seeded ``rng`` gives the same record.
    """
    if suffix_size < 2:
        raise ValueError(f"suffix_size must be at least 2 to allow a reordering, got {suffix_size}")
    tokens = sentence.split()
    if len(tokens) < suffix_size:
        return None
    prefix_tokens, suffix = tokens[:-suffix_size], tokens[-suffix_size:]
    if check_variety and len(set(suffix)) < 2:
        return None
    # Fewer than 3 distinct orderings cannot yield two shuffles that both differ from the
    # original; skip the sampling loop instead of burning all attempts.
    if distinct_orderings(suffix) < 3:
        return None
    shuffles = two_distinct_shuffles(suffix, rng, attempts)
    if shuffles is None:
        return None
    prompt_shuffle, negative_shuffle = shuffles

    drop = "none"
    if rng.random() < tag_drop_prob:
        drop = rng.choice(TAG_DROPS)

    # Re-join with single spaces so prompt, positive and negative agree token for token.
    text = " ".join(tokens)
    prefix = " ".join(prefix_tokens)
    multiset = " ".join(prompt_shuffle)
    negative_sentence = " ".join(prefix_tokens + negative_shuffle)
    meta = {
        "source": source,
        "prefix": prefix,
        "multiset": multiset,
        "n_words": len(tokens),
        "suffix_size": suffix_size,
        "negative_sentence": negative_sentence,
        "negative_tag_drop": drop,
    }
    if extra_meta:
        meta.update(extra_meta)
    return Record(
        id=record_id,
        prompt=format_prompt(prefix, multiset),
        positive=format_positive(text),
        negative=format_negative(negative_sentence, drop),
        reference=text,
        meta=meta,
    )


def make_record_widening(
    sentence: str,
    rng: random.Random,
    *,
    record_id: str,
    source: str,
    suffix_size: int = 3,
    attempts: int = 1000,
    tag_drop_prob: float = 0.1,
    extra_meta: dict | None = None,
) -> Record | None:
    """Like :func:`make_record` without the variety check, for sets that must keep every
    sentence (Harvard). If the last ``suffix_size`` tokens cannot be shuffled into two
    distinct new orders, the suffix is widened one token at a time (the prompt then
    lists more words); ``meta.suffix_size`` records the size used. Returns None only if
    even the whole sentence has too few distinct orderings (e.g. "no no no").
    """
    n_tokens = len(sentence.split())
    for size in range(suffix_size, n_tokens + 1):
        record = make_record(
            sentence,
            rng,
            record_id=record_id,
            source=source,
            suffix_size=size,
            attempts=attempts,
            tag_drop_prob=tag_drop_prob,
            check_variety=False,
            extra_meta=extra_meta,
        )
        if record is not None:
            return record
    return None
