"""Calibration, certification and evaluation embed a generation exactly as the server does.

The server stops at the first ``<verified>`` (an inclusive stop string); training decodes freely, so a model that
writes several answer/tag pairs would otherwise be embedded through its right-most tag in training and through its
first in serving.
"""

from __future__ import annotations

import pytest

from sdm_core.lm.embedding import served_generation, verification_prefix
from server.backends.base import GenerationRequest, SamplingParams
from server.backends.row import GenerationRow
from training.correctness import get_correctness
from training.generation import label_generations
from training.records import Record

TWO_PAIRS = "<answer>12</answer>\n<verified>Yes</verified>\n<answer>13</answer>\n<verified>No</verified>"


def _server_text(generation: str) -> str:
    """What the server's generation loop keeps of ``generation``: the text through its earliest stop string."""
    row = GenerationRow(GenerationRequest([1], SamplingParams(max_tokens=8), stop=(), stop_inclusive=("<verified>",)))
    row.text = generation
    return row.final_text if row.finish_at_stop() else generation


@pytest.mark.parametrize(
    "generation",
    [
        TWO_PAIRS,
        "<answer>12</answer> <verified>Yes</verified>",
        "<answer>12</answer>",
        "<answer>12</answer>\n<verified>Ye",
        "<verified>Yes</verified><answer>1</answer><verified>No</verified>",
        "<answer>1</answer><verified><verified>No</verified>",
        "",
    ],
)
def test_training_embeds_the_prefix_the_server_embeds(generation: str) -> None:
    assert verification_prefix(served_generation(generation)) == verification_prefix(_server_text(generation))


def test_a_second_answer_tag_pair_is_cut_off_and_the_first_tag_kept() -> None:
    assert served_generation(TWO_PAIRS) == "<answer>12</answer>\n<verified>Yes</verified>"
    # Without the cut, the head would see the second answer (the right-most tag), which serving never generates.
    assert verification_prefix(TWO_PAIRS) != verification_prefix(served_generation(TWO_PAIRS))


def test_the_cut_keeps_text_without_a_tag_and_is_idempotent() -> None:
    assert served_generation("<answer>12</answer>") == "<answer>12</answer>"
    assert served_generation("<answer>1</answer>\n<verified>Ye") == "<answer>1</answer>\n<verified>"
    once = served_generation(TWO_PAIRS)
    assert served_generation(once) == once


def test_labels_and_texts_describe_the_served_answer() -> None:
    records = [
        Record(
            id="a",
            prompt="Compute 5 + 7.",
            positive="<answer>12</answer>\n<verified>Yes</verified>",
            negative="<answer>13</answer>\n<verified>No</verified>",
            reference="12",
        )
    ]
    generated = label_generations(records, [TWO_PAIRS], get_correctness("arithmetic"))
    assert generated.texts == ["<answer>12</answer>\n<verified>Yes</verified>"]
    assert generated.labels == [1]
    # The served answer is wrong when its first answer is wrong, whatever follows it.
    wrong_first = "<answer>13</answer>\n<verified>Yes</verified>\n<answer>12</answer>\n<verified>Yes</verified>"
    assert label_generations(records, [wrong_first], get_correctness("arithmetic")).labels == [0]
