"""Prompt encoding: one BOS rule, left truncation of the context, lettered fallback."""

from __future__ import annotations

import pytest

from shared.ml.encoding import batches, bind, bos_policy, collate, encode_prompt
from shared.ml.models import build_tiny_tokenizer
from shared.ml.tasks.base import Example, Task


@pytest.fixture(scope="module")
def tok():
    return build_tiny_tokenizer()


def make_task(choices=("Yes", "No"), truncate="passage") -> Task:
    return Task(
        name="toy",
        template="{{passage}} Question: {{question}}? Answer:",
        choices=list(choices),
        loader=lambda: {"train": [], "val": [], "test": []},
        truncate_field=truncate,
    )


def test_prompt_is_normalised_and_answer_is_first_token(tok):
    bound = bind(make_task(), tok)
    ex = Example("toy/train/0", {"passage": "the  movie\nwas good", "question": "is it good"}, 1)
    enc = encode_prompt(bound, ex, tok, max_length=64)
    text = tok.decode(enc.input_ids)
    assert text.endswith("the movie was good Question: is it good? Answer:")
    assert enc.answer_token == tok(" No", add_special_tokens=False).input_ids[0]
    assert enc.label == 1 and enc.example_id == "toy/train/0"


def test_bos_rule_is_the_tokenizers_default(tok):
    # The tiny tokenizer adds no BOS by default, so none is prepended anywhere.
    assert bos_policy(tok) is None
    bound = bind(make_task(), tok)
    enc = encode_prompt(bound, Example("x", {"passage": "a", "question": "b"}, 0), tok)
    assert enc.input_ids[0] != tok.bos_token_id


def test_long_context_is_cut_from_the_left_and_keeps_the_question(tok):
    bound = bind(make_task(), tok)
    passage = " ".join(f"word{i}" for i in range(400))
    enc = encode_prompt(bound, Example("x", {"passage": passage, "question": "is it true"}, 0), tok, max_length=48)
    assert len(enc.input_ids) <= 48
    text = tok.decode(enc.input_ids)
    assert text.endswith("Question: is it true? Answer:")
    assert "word399" in text and "word0 " not in text


def test_colliding_choices_fall_back_to_letters(tok):
    task = make_task(choices=("qwerty", "qwertz"))
    bound = bind(task, tok)
    assert bound.letters == ["A", "B"]
    prompt = bound.prompt({"passage": "p", "question": "q"})
    assert prompt.endswith("Options: A: qwerty B: qwertz. Answer:")
    assert len(set(bound.choice_token_ids)) == 2


def test_batches_pad_and_track_answer_positions(tok):
    bound = bind(make_task(), tok)
    exs = [Example(f"x/{i}", {"passage": "w " * (i + 1), "question": "q"}, i % 2) for i in range(5)]
    encoded = [encode_prompt(bound, e, tok) for e in exs]
    out = batches(encoded, batch_size=2)
    assert sum(len(b) for b in out) == 5
    for b in out:
        for row in range(len(b)):
            last = int(b.last_index[row])
            assert b.attention_mask[row, last] == 1
            assert b.attention_mask[row, last + 1 :].sum() == 0
    single = collate(encoded[:1])
    assert single.input_ids.shape[1] == len(encoded[0].input_ids)
