"""Synthetic tasks: determinism, checkers, scratchpad arithmetic, several-answer task, encoding."""
import random

import pytest
import torch

from kdlab.errors import KdlabError
from kdlab.seq.tasks import (TASKS, addition_response, encode_examples, encode_prompts, get_task,
                             multiplication_response)
from kdlab.seq.tokenizer import CharTokenizer


@pytest.mark.parametrize("name", sorted(TASKS))
def test_make_is_deterministic_by_seed_and_prefix_stable(name):
    task = get_task(name)
    first = task.make(20, seed=3)
    assert first == get_task(name).make(20, seed=3)
    assert first != task.make(20, seed=4)
    assert task.make(5, seed=3) == first[:5]


@pytest.mark.parametrize("name", sorted(TASKS))
def test_checkers_accept_references_and_reject_corruptions(name):
    task = get_task(name)
    for prompt, response in task.make(50, seed=0):
        assert task.is_correct(prompt, response) and task.answer_correct(prompt, response)
        for wrong in (response + "1", response[:-1], "", "x" + response):
            assert not task.is_correct(prompt, wrong), (prompt, wrong)


@pytest.mark.parametrize("name", sorted(TASKS))
def test_default_sizes_fit_48_tokens_with_eos(name):
    task = get_task(name)
    assert max(len(p) + len(r) + 1 for p, r in task.make(2000, seed=1)) <= 48


def test_worst_case_lengths_fit_48_tokens():
    # The longest operands of the default options, built directly (sampling may miss them).
    assert len("999+999=" + addition_response(999, 999)) + 1 <= 48
    assert len("99*99=" + multiplication_response(99, 99)) + 1 <= 48


def test_scratchpad_final_answer_is_the_true_result():
    rng = random.Random(0)
    for _ in range(500):
        a, b = rng.randrange(10 ** rng.randint(1, 6)), rng.randrange(10 ** rng.randint(1, 6))
        m = rng.randrange(10 ** rng.randint(1, 3))
        assert addition_response(a, b).rsplit("|", 1)[1] == str(a + b)
        assert multiplication_response(a, m).rsplit("|", 1)[1] == str(a * m)
        # The column sums alone determine the answer: units digits, led by the last carry.
        sums = [int(step.split("=")[1]) for step in addition_response(a, b).split("|")[0].split(";")]
        assert int(str(sums[-1] // 10) + "".join(str(s % 10) for s in reversed(sums))) == a + b


def test_hand_worked_scratchpads():
    assert addition_response(456, 78) == "6+8+0=14;5+7+1=13;4+0+1=5|534"
    assert multiplication_response(47, 36) == "47*6=282;47*30=1410;282+1410=1692|1692"
    assert multiplication_response(47, 3) == "47*3=141|141"


def test_answer_correct_ignores_the_steps_but_exact_match_does_not():
    task = get_task("addition")
    prompt, response = "456+78=", "6+8+0=14;5+7+1=13;4+0+1=5|534"
    assert task.is_correct(prompt, response)
    sloppy = "wrong steps|534"
    assert task.answer_correct(prompt, sloppy) and not task.is_correct(prompt, sloppy)
    assert not task.answer_correct(prompt, "6+8+0=14|535") and not task.answer_correct(prompt, "534")


def test_arithmetic_mixes_both_operations():
    examples = get_task("arithmetic").make(100, seed=0)
    assert any("+" in p for p, _ in examples) and any("*" in p for p, _ in examples)


def test_sum_split_has_several_valid_answers_per_prompt():
    task = get_task("sum_split", min_n=13, max_n=13)
    references = {response for _, response in task.make(200, seed=0)}
    assert len(references) >= 8  # 14 valid answers drawn uniformly
    assert all(task.is_correct("n=13>", r) for r in references)
    assert task.is_correct("n=13>", "13+0") and task.is_correct("n=13>", "0+13")
    for wrong in ("6+6", "06+7", "6+7+0", "-1+14", "67", ""):
        assert not task.is_correct("n=13>", wrong), wrong


def test_string_tasks_by_hand():
    assert get_task("reverse").is_correct("rev:abc>", "cba")
    assert get_task("sort").is_correct("sort:3192>", "1239")
    letters = get_task("sort", symbols="letters").make(10, seed=0)
    assert all(p[5:-1].isalpha() and list(r) == sorted(r) for p, r in letters)


def test_unknown_task_and_option_errors():
    with pytest.raises(KdlabError, match=r"did you mean addition\?.*known tasks"):
        get_task("additon")
    with pytest.raises(KdlabError, match=r"no option 'digit'; did you mean digits\?"):
        get_task("addition", digit=2)
    with pytest.raises(KdlabError, match="min_length=5 is larger than max_length=2"):
        get_task("reverse", min_length=5, max_length=2)
    with pytest.raises(KdlabError, match="does not match task addition"):
        get_task("addition").is_correct("rev:abc>", "cba")


def test_encode_examples_canonical_layout():
    tokenizer = CharTokenizer()
    tokens, labels = encode_examples([("1+2=", "3"), ("n=5>", "2+3")], tokenizer)
    enc, eos, pad = tokenizer.encode, tokenizer.eos_id, tokenizer.pad_id
    assert tokens.dtype == labels.dtype == torch.int64 and tokens.shape == (2, 8)
    assert tokens[0].tolist() == enc("1+2=3") + [eos, pad, pad]
    assert labels[0].tolist() == [-100] * 4 + enc("3") + [eos, -100, -100]
    assert tokens[1].tolist() == enc("n=5>2+3") + [eos]
    assert labels[1].tolist() == [-100] * 4 + enc("2+3") + [eos]


def test_encode_examples_context_error_names_lengths():
    with pytest.raises(KdlabError, match=r"4 prompt \+ 4 response tokens .* = 8 > context_length 7"):
        encode_examples([("1+2=", "3"), ("n=5>", "2+3")], CharTokenizer(), context_length=7)


def test_encode_prompts_right_pads():
    tokenizer = CharTokenizer()
    prompts, lengths = encode_prompts(["ab", "abcd"], tokenizer)
    assert lengths.tolist() == [2, 4]
    assert prompts[0].tolist() == tokenizer.encode("ab") + [0, 0]
