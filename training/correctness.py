"""Correctness functions r and the training-time response checks (spec §3.2, §3.3, §4.3).

Every correctness function has the signature ``r(generation, reference) -> bool``:
``generation`` is the model's decoded response, ``reference`` is the record's
``reference`` field. Look them up by name with :func:`get_correctness`.
"""

from __future__ import annotations

import re
from collections.abc import Callable

from training.records import NO_TAG, YES_TAG

_SENTENCE_RE = re.compile(r"<sentence>(.*?)</sentence>", re.DOTALL)
_VERIFIED_RE = re.compile(r"<verified>(.*?)</verified>", re.DOTALL)


def first_sentence(text: str, require_verified: bool = True) -> str:
    """Content of the first ``<sentence>...</sentence>`` in ``text``, or "" if none.

    With ``require_verified`` (the label extractor of §4.3) sentence i counts only when a
    ``<verified>...</verified>`` tag with the same index i exists; pairing is by position
    in the two lists of matches, not by adjacency. Without it (the Table 3
    "sentence accuracy" extractor) the first sentence tag counts on its own.
    """
    sentences = _SENTENCE_RE.findall(text)
    if not require_verified:
        return sentences[0] if sentences else ""
    # zip pairs sentence i with verified tag i and stops at the shorter list, so a
    # sentence without a same-index verified tag is never returned.
    paired = list(zip(sentences, _VERIFIED_RE.findall(text)))
    return paired[0][0] if paired else ""


def word_order(generation: str, reference: str) -> bool:
    """r for the word-ordering task: the first paired sentence has exactly the reference's
    words in order (whitespace-insensitive, case-sensitive)."""
    return reference.strip().split() == first_sentence(generation).strip().split()


def exact_match(generation: str, reference: str) -> bool:
    """r that requires the whole response to equal the reference after stripping."""
    return generation.strip() == reference.strip()


CORRECTNESS: dict[str, Callable[[str, str], bool]] = {
    "word_order": word_order,
    "exact_match": exact_match,
}


def get_correctness(name: str) -> Callable[[str, str], bool]:
    """The correctness function registered under ``name``; ValueError lists the known ones."""
    try:
        return CORRECTNESS[name]
    except KeyError:
        known = ", ".join(sorted(CORRECTNESS))
        raise ValueError(f"unknown correctness function {name!r}; known names: {known}") from None


def is_verbatim(generation: str, positive: str) -> bool:
    """Training-time check (§3.3): the response is the formatted positive, verbatim after
    stripping outer whitespace, or the same text with the final tag flipped to No.

    Such a response is never stored as a hard negative. ``positive`` must end with the
    Yes tag (as every validated Record's positive does).
    """
    target = positive.strip()
    if not target.endswith(YES_TAG):
        raise ValueError(f"positive must end with {YES_TAG}; got ...{target[-40:]!r}")
    with_no = target[: -len(YES_TAG)] + NO_TAG
    got = generation.strip()
    return got == target or got == with_no


def normalize_hard_negative(generation: str) -> str:
    """Turn a generated response into a negative that ends with the No tag (§3.2).

    The text is stripped; a trailing No tag is kept, a trailing Yes tag is replaced by
    No, and a response without a final tag gets ``\\n<verified>No</verified>`` appended.
    ``\\n\\n`` is appended in every case, matching the reference encoding.
    """
    text = generation.strip()
    if text.endswith(NO_TAG):
        return text + "\n\n"
    if text.endswith(YES_TAG):
        return text[: -len(YES_TAG)] + NO_TAG + "\n\n"
    return text + "\n" + NO_TAG + "\n\n"
