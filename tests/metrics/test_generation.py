"""Generation metrics (kdlab.metrics.generation) against float64 references and hand-worked values."""
import math
import random

import pytest
import torch

from kdlab.metrics.generation import (exact_match, last_number, lcs_length, mean_rouge_l, per_token_kl,
                                      prediction_mask, response_mask, response_nll, response_stats, rouge_l,
                                      rouge_tokens)

EOS = PAD = 2  # pad == EOS, as SmolLM2, Llama 3 and Qwen ship


def reference_kl(p_logits, q_logits, mask):
    """Sum over positions and vocabulary written out in float64 Python arithmetic."""
    total, count = 0.0, 0
    for b in range(p_logits.shape[0]):
        for t in range(p_logits.shape[1]):
            if not mask[b, t]:
                continue
            p = [math.exp(x) for x in p_logits[b, t].double().tolist()]
            q = [math.exp(x) for x in q_logits[b, t].double().tolist()]
            zp, zq = sum(p), sum(q)
            total += sum(pv / zp * math.log((pv / zp) / (qv / zq)) for pv, qv in zip(p, q))
            count += 1
    return total / count


def test_per_token_kl_in_both_directions_matches_a_float64_reference():
    generator = torch.Generator().manual_seed(0)
    student = torch.randn(3, 6, 11, generator=generator, dtype=torch.float64) * 2
    teacher = torch.randn(3, 6, 11, generator=generator, dtype=torch.float64) * 2
    mask = torch.rand(3, 6, generator=generator) > 0.4
    reverse = per_token_kl(student, teacher, mask)  # KL(student || teacher) on the student's samples
    forward = per_token_kl(teacher, student, mask)  # KL(teacher || student) on the teacher's samples
    assert reverse.dtype == torch.float64
    assert abs(float(reverse) - reference_kl(student, teacher, mask)) < 1e-12
    assert abs(float(forward) - reference_kl(teacher, student, mask)) < 1e-12
    assert abs(float(reverse) - float(forward)) > 1e-3  # the two directions differ
    assert float(per_token_kl(student, student, mask)) == 0.0
    assert float(per_token_kl(student, teacher, torch.zeros(3, 6, dtype=torch.bool))) == 0.0
    halved = per_token_kl(student, teacher, mask, temperature=2.0)
    assert abs(float(halved) - reference_kl(student / 2, teacher / 2, mask)) < 1e-12


def test_response_nll_scores_only_response_tokens():
    generator = torch.Generator().manual_seed(1)
    logits = torch.randn(2, 5, 7, generator=generator, dtype=torch.float64)
    labels = torch.tensor([[-100, -100, 3, 4, EOS], [-100, 5, EOS, -100, -100]])
    expected, count = 0.0, 0
    for b in range(2):
        for t in range(1, 5):
            if labels[b, t] != -100:
                row = logits[b, t - 1].tolist()
                expected += math.log(sum(math.exp(x) for x in row)) - row[int(labels[b, t])]
                count += 1
    assert abs(float(response_nll(logits, labels)) - expected / count) < 1e-12
    assert prediction_mask(labels).tolist() == [[False, True, True, True, False], [True, True, False, False, False]]


def test_the_final_eos_is_kept_when_pad_equals_eos():
    """The bug class: a mask built as `responses != pad` drops the final EOS when pad == EOS."""
    responses = torch.tensor([[5, 6, EOS, PAD, PAD], [7, EOS, PAD, PAD, PAD], [8, 9, 10, 11, 12], [EOS, PAD, PAD, PAD, PAD]])
    mask = response_mask(responses, eos_id=EOS)
    assert mask.tolist() == [[True, True, True, False, False], [True, True, False, False, False],
                             [True] * 5, [True, False, False, False, False]]
    naive = responses != PAD
    assert not bool(naive[0, 2]) and bool(mask[0, 2])  # what the naive mask loses, this one keeps
    assert response_stats(responses, eos_id=EOS) == {"mean_length": (3 + 2 + 5 + 1) / 4, "eos_fraction": 0.75}


def test_rouge_l_hand_worked_values_from_lin_2004():
    """Lin (2004), section 3.1: reference S1 'police killed the gunman'. S2 'police kill the gunman' shares the
    LCS 'police the gunman' (3 of 4 words): R = P = F = 3/4. S3 'the gunman kill police' shares 'the gunman':
    R = P = F = 2/4. ROUGE-L tells them apart where ROUGE-2 does not."""
    reference = "police killed the gunman"
    assert rouge_l("police kill the gunman", reference) == {"precision": 0.75, "recall": 0.75, "f1": 0.75}
    assert rouge_l("the gunman kill police", reference) == {"precision": 0.5, "recall": 0.5, "f1": 0.5}
    # Unequal lengths: candidate 'the gunman' (2 words): P = 2/2, R = 2/4, F = 2PR/(P+R) = 2/3.
    score = rouge_l("The gunman!", reference)
    assert score["precision"] == 1.0 and score["recall"] == 0.5 and abs(score["f1"] - 2 / 3) < 1e-15
    assert rouge_l("", reference) == {"precision": 0.0, "recall": 0.0, "f1": 0.0}
    assert rouge_l("nothing shared", reference)["f1"] == 0.0
    assert rouge_tokens("Hello, World! x_y 3.5") == ["hello", "world", "x", "y", "3", "5"]
    assert lcs_length("ABCBDAB", "BDCABA") == 4  # CLRS's example
    assert mean_rouge_l(["police kill the gunman", "x"], [reference, None]) == 0.75
    assert mean_rouge_l(["x"], [None]) is None


def test_rouge_l_equals_the_rouge_score_package():
    rouge_scorer = pytest.importorskip("rouge_score.rouge_scorer")
    scorer = rouge_scorer.RougeScorer(["rougeL"])
    rng = random.Random(0)
    words = "the a cat sat on mat dog ran 3.5 x_y Über naïve , . ! police gunman killed".split()
    for _ in range(500):
        a = " ".join(rng.choice(words) for _ in range(rng.randrange(0, 12)))
        b = " ".join(rng.choice(words) for _ in range(rng.randrange(0, 12)))
        theirs = scorer.score(b, a)["rougeL"]  # score(target, prediction)
        ours = rouge_l(a, b)
        assert (ours["precision"], ours["recall"], ours["f1"]) == pytest.approx(
            (theirs.precision, theirs.recall, theirs.fmeasure), abs=1e-15)


def test_exact_match_of_arithmetic_answers():
    assert last_number("The answer is 1,234.") == "1234" and last_number("no digits") is None
    assert last_number("-5 then 12") == "12"
    responses = ["5", "The answer is 42", "41", "I think 7, no 8"]
    assert exact_match(responses, ["5", "42", "42", "8"]) == 0.75
    assert exact_match(responses, ["5", "42", "42", "8"], numeric=False) == 0.25
    assert exact_match([], []) == 0.0
