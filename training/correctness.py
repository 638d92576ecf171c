"""Correctness functions r and the training-time response checks (spec §3.2, §3.3, §4.3).

Every correctness function has the signature ``r(generation, reference) -> bool``:
``generation`` is the model's decoded response, ``reference`` is the record's
``reference`` field (its ``positive`` when the record has none). :func:`get_correctness`
resolves a ``--correctness`` value in this order:

1. a built-in name (:data:`CORRECTNESS`: ``word_order``, ``arithmetic``, ``exact_match``);
2. ``package.module:function``: the module is imported and the function looked up (a
   dotted attribute path after the colon also works, e.g. ``pkg.mod:Task.check``);
3. a name registered by an installed package under the entry-point group
   ``sdm_lm.correctness`` (in its pyproject.toml:
   ``[project.entry-points."sdm_lm.correctness"] my_task = "my_pkg.checks:my_task"``).

Whatever is found must be callable with two positional arguments; anything else is a
ValueError that says what was wrong and how to fix it. docs/your-task.md has a complete
example.
"""

from __future__ import annotations

import importlib
import inspect
import re
from collections.abc import Callable, Mapping
from importlib.metadata import entry_points

from training.records import NO_TAG, YES_TAG

ENTRY_POINT_GROUP = "sdm_lm.correctness"

# The --help line of every command's --correctness flag.
CORRECTNESS_HELP = (
    "correctness function r(generation, reference) -> bool: a built-in name (word_order, arithmetic, "
    f"exact_match), package.module:function, or a name registered under the {ENTRY_POINT_GROUP} entry-point group"
)

Correctness = Callable[[str, str], bool]

_VERIFIED_RE = re.compile(r"<verified>(.*?)</verified>", re.DOTALL)
_TAG_NAME_RE = re.compile(r"^[A-Za-z][A-Za-z0-9_-]*$")
# An integer written plainly ("-1234") or with comma thousands separators ("-1,234").
_INTEGER_RE = re.compile(r"^[+-]?(?:\d+|\d{1,3}(?:,\d{3})+)$")


def first_tagged(text: str, tag: str, require_verified: bool = True) -> str:
    """Content of the first ``<tag>...</tag>`` in ``text``, or "" if none.

    With ``require_verified`` (the label extractor of §4.3) element i counts only when a
    ``<verified>...</verified>`` tag with the same index i exists; pairing is by position
    in the two lists of matches, not by adjacency. Without it (the Table 3
    "sentence accuracy" extractor) the first element counts on its own.
    """
    if not _TAG_NAME_RE.match(tag):
        raise ValueError(f"tag must be an XML-like name such as 'answer', got {tag!r}")
    found = re.findall(rf"<{tag}>(.*?)</{tag}>", text, re.DOTALL)
    if not require_verified:
        return found[0] if found else ""
    # zip pairs element i with verified tag i and stops at the shorter list, so an
    # element without a same-index verified tag is never returned.
    paired = list(zip(found, _VERIFIED_RE.findall(text)))
    return paired[0][0] if paired else ""


def first_sentence(text: str, require_verified: bool = True) -> str:
    """Content of the first ``<sentence>...</sentence>`` (see :func:`first_tagged`)."""
    return first_tagged(text, "sentence", require_verified)


def word_order(generation: str, reference: str) -> bool:
    """r for the word-ordering task: the first paired sentence has exactly the reference's
    words in order (whitespace-insensitive, case-sensitive)."""
    return reference.strip().split() == first_sentence(generation).strip().split()


def parse_integer(text: str) -> int | None:
    """The integer ``text`` spells (outer whitespace, a sign and comma thousands separators
    allowed), or None when it is not exactly one integer."""
    text = text.strip().replace("\u2212", "-")  # a typographic minus sign is still a minus
    if not _INTEGER_RE.match(text):
        return None
    return int(text.replace(",", ""))


def arithmetic(generation: str, reference: str) -> bool:
    """r for the arithmetic task: the first paired ``<answer>`` holds an integer equal in value
    to the reference ("0042" and "42" agree; "42.0", "forty-two" and "42 apples" do not). A record
    without a reference passes its positive, whose own first answer then gives the value."""
    expected = parse_integer(reference)
    if expected is None:
        expected = parse_integer(first_tagged(reference, "answer"))
    if expected is None:
        raise ValueError(
            f"arithmetic reference {reference[:80]!r} is not an integer; the record's 'reference' "
            'must hold the exact value, e.g. "5758" (or its positive an <answer> with it)'
        )
    return parse_integer(first_tagged(generation, "answer")) == expected


def exact_match(generation: str, reference: str) -> bool:
    """r that requires the whole response to equal the reference after stripping."""
    return generation.strip() == reference.strip()


CORRECTNESS: dict[str, Correctness] = {
    "word_order": word_order,
    "arithmetic": arithmetic,
    "exact_match": exact_match,
}


def registered_names() -> dict[str, str]:
    """{name: "module:attr"} of every correctness function installed packages register under
    the ``sdm_lm.correctness`` entry-point group (loaded lazily, so nothing is imported here)."""
    return {ep.name: ep.value for ep in entry_points(group=ENTRY_POINT_GROUP)}


def check_signature(fn: object, where: str) -> Correctness:
    """``fn`` if it can be called as ``fn(generation, reference)``; ValueError naming ``where`` otherwise."""
    if not callable(fn):
        raise ValueError(
            f"correctness {where} is a {type(fn).__name__}, not a function; point it at a "
            "function r(generation: str, reference: str) -> bool"
        )
    try:
        signature = inspect.signature(fn)
    except (TypeError, ValueError):
        return fn  # some callables written in C expose no signature; they are called as they are
    try:
        signature.bind("generation", "reference")
    except TypeError as exc:
        raise ValueError(
            f"correctness {where} has the signature {getattr(fn, '__qualname__', 'r')}{signature}, which "
            f"cannot be called as r(generation, reference) ({exc}); define it as "
            "def r(generation: str, reference: str) -> bool"
        ) from None
    return fn


def _import_path(spec: str) -> Correctness:
    module_name, _, attr_path = spec.partition(":")
    if not module_name or not attr_path:
        raise ValueError(f"correctness {spec!r}: expected package.module:function with both parts non-empty")
    try:
        module = importlib.import_module(module_name)
    except ImportError as exc:
        raise ValueError(
            f"correctness {spec!r}: cannot import module {module_name!r} ({exc}); install the package "
            "that provides it, or run from the folder that holds it (it must be on PYTHONPATH)"
        ) from None
    target: object = module
    for part in attr_path.split("."):
        try:
            target = getattr(target, part)
        except AttributeError:
            raise ValueError(
                f"correctness {spec!r}: module {module_name!r} has no attribute {attr_path!r}; "
                "check the function's name after the colon"
            ) from None
    return check_signature(target, repr(spec))


def bundle_correctness(provenance: Mapping) -> str:
    """The name of the r a bundle was calibrated with: what its provenance records (word ordering, the task the
    first bundles were built for, where it records none)."""
    return provenance.get("correctness") or "word_order"


def get_correctness(name: str) -> Correctness:
    """The correctness function for ``name``: a built-in name, ``package.module:function``, or
    a name registered under the ``sdm_lm.correctness`` entry-point group (in that order).
    ValueError says what was wrong and lists the names that exist."""
    if not isinstance(name, str) or not name.strip():
        raise ValueError("correctness must be a non-empty name or package.module:function")
    name = name.strip()
    if name in CORRECTNESS:
        return CORRECTNESS[name]
    if ":" in name:
        return _import_path(name)
    for ep in entry_points(group=ENTRY_POINT_GROUP):
        if ep.name == name:
            try:
                fn = ep.load()
            except (ImportError, AttributeError) as exc:
                raise ValueError(
                    f"correctness {name!r} is registered by an installed package as {ep.value!r} "
                    f"(entry-point group {ENTRY_POINT_GROUP}) but does not load: {exc}; reinstall "
                    "that package or fix its entry point"
                ) from None
            return check_signature(fn, f"{name!r} (entry point {ep.value!r})")
    known = sorted(CORRECTNESS) + sorted(registered_names())
    raise ValueError(
        f"unknown correctness function {name!r}; known names: {', '.join(known)}; or give your own as "
        f"package.module:function, or register a name under the entry-point group {ENTRY_POINT_GROUP}"
    )


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
