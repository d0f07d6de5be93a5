"""Generation evaluation of a student against its teacher (kdlab.seq.generation_eval), on tiny models."""
import math

import pytest
import torch

import kdlab.seq  # noqa: F401  (registers tinygpt and the tasks)
from kdlab.metrics.generation import per_token_kl, prediction_mask
from kdlab.registry import get
from kdlab.seq.generation_eval import evaluate_generation
from kdlab.seq.sampling import generate, prompts_from_canonical


@pytest.fixture(scope="module")
def task():
    return get("dataset", "reverse")(num_train=8, num_test=6, seed=0)


def tiny(task, seed):
    torch.manual_seed(seed)
    return get("model", "tinygpt")(input_shape=(task.info.context_length,), num_classes=task.vocab_size, layers=1,
                                   width=32, heads=2).eval()


def test_a_student_equal_to_its_teacher_scores_zero_divergence(task):
    model = tiny(task, 0)
    metrics, samples = evaluate_generation(model, model, task.tokens_test, task.labels_test, task.info,
                                           max_new_tokens=6, batch_size=4)
    assert metrics["reverse_kl"] == 0.0 and metrics["forward_kl"] == 0.0
    assert metrics["length"] == metrics["teacher_length"] and metrics["eos_fraction"] == metrics["teacher_eos_fraction"]
    assert all(s["student"] == s["teacher"] for s in samples) and len(samples) == 6
    assert {"prompt", "student", "teacher", "reference"} == set(samples[0]) and samples[0]["reference"]
    assert samples[0]["prompt"].startswith("rev:")
    assert 0 < metrics["teacher_nll"] and math.isfinite(metrics["teacher_nll"])
    assert 0.0 <= metrics["rouge_l_reference"] <= 1.0 and 0.0 <= metrics["acc"] <= 1.0


def test_divergences_match_a_direct_computation_and_are_reproducible(task):
    student, teacher = tiny(task, 1), tiny(task, 2)
    run = dict(max_new_tokens=5, batch_size=6, seed=3)
    metrics, _ = evaluate_generation(student, teacher, task.tokens_test, task.labels_test, task.info, **run)
    again, _ = evaluate_generation(student, teacher, task.tokens_test, task.labels_test, task.info, **run)
    assert metrics == again
    # The same draws by hand: one batch, one generator, student's greedy, teacher's greedy, student's, teacher's samples.
    generator = torch.Generator().manual_seed(3)
    prompts, lengths = prompts_from_canonical(task.tokens_test, task.labels_test, pad_id=task.info.pad_id)
    options = dict(max_new_tokens=5, eos_id=task.info.eos_id, pad_id=task.info.pad_id)
    generate(student, prompts, lengths, temperature=0.0, **options)
    generate(teacher, prompts, lengths, temperature=0.0, **options)
    own = generate(student, prompts, lengths, temperature=1.0, generator=generator, **options)
    theirs = generate(teacher, prompts, lengths, temperature=1.0, generator=generator, **options)
    with torch.no_grad():
        reverse = per_token_kl(student(own.tokens).double(), teacher(own.tokens).double(), prediction_mask(own.labels))
        forward = per_token_kl(teacher(theirs.tokens).double(), student(theirs.tokens).double(),
                               prediction_mask(theirs.labels))
    assert metrics["reverse_kl"] == pytest.approx(float(reverse), rel=1e-5)
    assert metrics["forward_kl"] == pytest.approx(float(forward), rel=1e-5)
    assert metrics["reverse_kl"] > 0 and metrics["rouge_l_teacher"] <= 1.0


def test_modes_are_restored(task):
    student, teacher = tiny(task, 1).train(), tiny(task, 2).eval()
    evaluate_generation(student, teacher, task.tokens_test[:2], task.labels_test[:2], task.info, max_new_tokens=3)
    assert student.training and not teacher.training


def test_hf_models_with_pad_equal_to_eos_and_prompts_without_reference(tmp_path, tiny_llama_folder):
    pytest.importorskip("transformers")
    from kdlab.seq.hf_export import drop_layers

    path = tmp_path / "p.jsonl"
    path.write_text('{"prompt": "What is 1 plus 2?", "completion": "3"}\n{"prompt": "Say hi."}\n' * 3)
    arrays = get("dataset", "prompts")(root=None, cache_dir=tmp_path, path=str(path), tokenizer=str(tiny_llama_folder),
                                       chat_template=True, max_prompt_tokens=32, max_new_tokens=4, test_fraction=0.5)
    teacher = get("model", "hf_causal_lm")(input_shape=(arrays.info.context_length,), num_classes=arrays.vocab_size,
                                           path=str(tiny_llama_folder))
    student = drop_layers(teacher, 2)
    metrics, samples = evaluate_generation(student, teacher, arrays.tokens_test, arrays.labels_test, arrays.info,
                                           max_new_tokens=4)
    assert len(samples) == 3 and {s["reference"] for s in samples} <= {"3", None}
    assert None in {s["reference"] for s in samples}  # "Say hi." had no completion
    assert all(s["prompt"].startswith("user\n") for s in samples)
    assert metrics["reverse_kl"] > 0 and 1 <= metrics["length"] <= 4 and math.isfinite(metrics["teacher_nll"])
