"""CONTRASTIVE-MASKING masks and the SDM next-token loss (issue: training; SDM_SPEC §3.2, §3.4)."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from sdm_core.lm.embedding import ChatFormat, HiddenStateRecipe, chat_messages, verification_text
from training.encoding import IGNORE_INDEX, collate, encode_instance
from training.loss import ce_token_loss, logits_to_keep, sdm_token_loss

PROMPT = (
    "Complete the sentence 'Neat plans' by reordering all of the following without adding new punctuation nor "
    "words: 'fail luck. without'."
)
POSITIVE = "<sentence>Neat plans fail without luck.</sentence>\n<verified>Yes</verified>"
NEGATIVE = "<sentence>Neat plans without fail luck.\n<verified>No</verified>"
CHAT = ChatFormat()


def _trained_text(tokenizer, encoded) -> str:
    return tokenizer.decode([t for t in encoded.labels if t != IGNORE_INDEX])


def test_positive_trains_on_the_whole_completion_and_template_end(tiny_tokenizer):
    enc = encode_instance(tiny_tokenizer, PROMPT, POSITIVE, 1, CHAT)
    assert _trained_text(tiny_tokenizer, enc) == POSITIVE + "<|im_end|>\n"
    # Everything before the completion (system, user, assistant header) is masked.
    prompt_len = len(
        tiny_tokenizer(
            tiny_tokenizer.apply_chat_template(
                [{"role": "system", "content": CHAT.system_prompt}, {"role": "user", "content": PROMPT}],
                tokenize=False,
                add_generation_prompt=True,
            ),
            add_special_tokens=False,
        )["input_ids"]
    )
    assert all(t == IGNORE_INDEX for t in enc.labels[:prompt_len])
    assert all(t != IGNORE_INDEX for t in enc.labels[prompt_len:])


def test_negative_trains_only_from_the_final_no_tag(tiny_tokenizer):
    enc = encode_instance(tiny_tokenizer, PROMPT, NEGATIVE, 0, CHAT)
    assert _trained_text(tiny_tokenizer, enc) == "<verified>No</verified><|im_end|>\n"


def test_negative_with_an_earlier_no_tag_uses_the_last_one(tiny_tokenizer):
    response = (
        "<sentence>a</sentence>\n<verified>No</verified> then <sentence>b</sentence>\n<verified>No</verified>\n\n"
    )
    enc = encode_instance(tiny_tokenizer, PROMPT, response, 0, CHAT)
    assert _trained_text(tiny_tokenizer, enc) == "<verified>No</verified>\n\n<|im_end|>\n"


def test_negative_without_no_tag_is_rejected(tiny_tokenizer):
    with pytest.raises(ValueError, match="verified"):
        encode_instance(tiny_tokenizer, PROMPT, "<sentence>x</sentence>", 0, CHAT)


def test_messages_prompt_is_encoded_like_a_string_prompt(tiny_tokenizer):
    messages = [{"role": "system", "content": CHAT.system_prompt}, {"role": "user", "content": PROMPT}]
    assert encode_instance(tiny_tokenizer, messages, POSITIVE, 1, CHAT) == encode_instance(
        tiny_tokenizer, PROMPT, POSITIVE, 1, CHAT
    )


def test_a_chat_without_a_system_turn_gets_the_formats_system_prompt(tiny_tokenizer):
    # One user turn must be conditioned as the same string prompt (the server's chat route relies on it); the
    # template's own default system turn would be text the SDM head never saw.
    user_only = [{"role": "user", "content": PROMPT}]
    as_string = encode_instance(tiny_tokenizer, PROMPT, POSITIVE, 1, CHAT)
    assert encode_instance(tiny_tokenizer, user_only, POSITIVE, 1, CHAT) == as_string
    assert verification_text(tiny_tokenizer, user_only, POSITIVE, CHAT, HiddenStateRecipe()) == verification_text(
        tiny_tokenizer, PROMPT, POSITIVE, CHAT, HiddenStateRecipe()
    )
    own = [{"role": "system", "content": "Answer tersely."}, {"role": "user", "content": PROMPT}]
    assert chat_messages(own, CHAT) == own, "a chat's own system turn is kept, not doubled"
    assert chat_messages(user_only, ChatFormat(system_prompt=None)) == user_only


def test_collate_right_pads_and_masks_padding(tiny_tokenizer):
    a = encode_instance(tiny_tokenizer, PROMPT, POSITIVE, 1, CHAT)
    b = encode_instance(tiny_tokenizer, "short", POSITIVE, 1, CHAT)
    ids, mask, labels = collate([a, b], pad_id=2)
    assert ids.shape == labels.shape == mask.shape
    assert int(mask[1].sum()) == len(b.input_ids)
    assert bool((labels[1, len(b.input_ids) :] == IGNORE_INDEX).all())


def test_sdm_loss_equals_cross_entropy_when_base_is_e():
    torch.manual_seed(0)
    logits = torch.randn(3, 7, 11)
    labels = torch.randint(0, 11, (3, 7))
    labels[:, :2] = IGNORE_INDEX
    sdm, n = sdm_token_loss(logits, labels, torch.full((3,), math.e))
    ce, n_ce = ce_token_loss(logits, labels)
    reference = F.cross_entropy(
        logits[:, :-1].reshape(-1, 11), labels[:, 1:].reshape(-1), ignore_index=IGNORE_INDEX, reduction="sum"
    )
    assert n == n_ce == int((labels[:, 1:] != IGNORE_INDEX).sum())
    assert torch.allclose(sdm, ce, atol=1e-5) and torch.allclose(ce, reference, atol=1e-5)


@pytest.mark.parametrize("s, expected", [(0.0, 0.9844), (0.5, 0.5900), (0.9, 0.4346), (1.0, 0.4064)])
def test_sdm_loss_matches_the_spec_hand_computed_values(s, expected):
    # SDM_SPEC §3.4: logits (2, 1, 0.5, -1), target 0, base 2 + s.
    labels = torch.tensor([[IGNORE_INDEX, 0]])  # position 0's logits predict position 1's label
    logits = torch.tensor([[[2.0, 1.0, 0.5, -1.0], [0.0, 0.0, 0.0, 0.0]]])
    loss, n = sdm_token_loss(logits, labels, torch.tensor([2.0 + s]))
    assert n == 1
    assert float(loss) == pytest.approx(expected, abs=1e-4)


def test_sdm_loss_is_lower_for_a_confident_correct_layer():
    torch.manual_seed(1)
    logits = torch.randn(1, 5, 9) * 3
    labels = torch.randint(0, 9, (1, 5))
    low, _ = sdm_token_loss(logits, labels, torch.tensor([3.0]))
    high, _ = sdm_token_loss(logits, labels, torch.tensor([2.0]))
    assert float(low) < float(high)


def test_sdm_loss_base_is_detached_and_gradient_flows_to_logits():
    logits = torch.randn(2, 4, 6, requires_grad=True)
    base = torch.tensor([2.3, 2.9], requires_grad=True)
    loss, _ = sdm_token_loss(logits, torch.randint(0, 6, (2, 4)), base)
    loss.backward()
    assert logits.grad is not None and torch.isfinite(logits.grad).all()
    assert base.grad is None


def test_sdm_loss_rejects_a_base_at_or_below_one():
    with pytest.raises(ValueError, match="base"):
        sdm_token_loss(torch.randn(1, 3, 4), torch.zeros(1, 3, dtype=torch.long), torch.tensor([1.0]))


def test_losses_over_the_kept_final_logits_equal_the_losses_over_all_logits():
    # The trainer asks the model for the logits of the last logits_to_keep(labels) positions only.
    torch.manual_seed(2)
    logits = torch.randn(3, 9, 13)
    labels = torch.randint(0, 13, (3, 9))
    labels[0, :6] = IGNORE_INDEX  # rows whose masked prompts differ in length, as in a right-padded batch
    labels[1, :4] = IGNORE_INDEX
    labels[1, 7:] = IGNORE_INDEX  # padding
    labels[2, :] = IGNORE_INDEX  # a row with nothing to train
    keep = logits_to_keep(labels)
    assert keep == 9 - 3  # position 3's logits predict row 1's first unmasked label (position 4)
    base = torch.tensor([2.2, 2.7, 2.9])
    full, n_full = sdm_token_loss(logits, labels, base)
    kept, n_kept = sdm_token_loss(logits[:, -keep:], labels, base)
    assert n_kept == n_full and torch.allclose(kept, full, atol=1e-6)
    ce_full, _ = ce_token_loss(logits, labels)
    ce_kept, _ = ce_token_loss(logits[:, -keep:], labels)
    assert torch.allclose(ce_kept, ce_full, atol=1e-6)
    # Too few kept positions would drop trained tokens: the count shows it.
    assert sdm_token_loss(logits[:, -(keep - 1) :], labels, base)[1] < n_full


def test_logits_to_keep_is_one_when_nothing_is_trained():
    labels = torch.full((2, 5), IGNORE_INDEX)
    assert logits_to_keep(labels) == 1
    assert sdm_token_loss(torch.randn(2, 1, 4), labels, torch.tensor([2.5, 2.5]))[1] == 0


def test_loss_rejects_more_logit_positions_than_labels():
    with pytest.raises(ValueError, match="last K"):
        ce_token_loss(torch.randn(1, 4, 3), torch.zeros(1, 3, dtype=torch.long))
