"""Sequence models and tasks for distilling auto-regressive models (GKD, issue #4).

Importing this package registers the ``tinygpt`` and ``hf_causal_lm`` models and one dataset per task. Modules:

* ``tokenizer`` — ``CharTokenizer`` over one fixed alphabet (``<pad>`` 0, ``<eos>`` 1);
* ``tinygpt`` — ``TinyGPT`` decoder with a KV cache (the sequence-model protocol);
* ``sampling`` — batched cached ``generate`` returning the canonical layout;
* ``tasks`` — synthetic prompt -> response tasks, checkers and ``encode_examples``;
* ``datasets`` — each task registered as a dataset; ``evaluate`` — exact match, token accuracy, agreement;
* ``hf`` — any Hugging Face causal LM as teacher or student (optional extra); ``hf_load`` (folders, GGUF,
  the bundled SmolLM2), ``hf_export`` (layer dropping, HF folders, tokenizer check); ``hf_rules`` (their
  config rules: ``student.init: teacher``, ``keep_layers``, ``data.tokenizer: teacher``, context lengths);
* ``prompt_dataset`` — the ``prompts`` dataset (prompt files or built-in sets, HF tokenizers);
  ``generation_eval`` — a student's open-ended generations scored against its teacher's.

The canonical layout everywhere: ``tokens`` (N, L) right-padded (prompt, response,
EOS, pad) and ``labels`` (N, L) = the token at response positions, -100 elsewhere.
"""
from kdlab.seq import datasets, hf, hf_rules, peft, prompt_dataset, sampling, tasks, tinygpt, tokenizer  # noqa: F401  (registers)
from kdlab.seq.sampling import Generation, generate, pack_canonical, prompts_from_canonical
from kdlab.seq.tasks import TASKS, Task, encode_examples, encode_prompts, get_task
from kdlab.seq.tinygpt import KVCache, TinyGPT
from kdlab.seq.tokenizer import ALPHABET, CharTokenizer

__all__ = ["ALPHABET", "CharTokenizer", "Generation", "KVCache", "TASKS", "Task", "TinyGPT", "encode_examples",
           "encode_prompts", "generate", "get_task", "pack_canonical", "prompts_from_canonical"]
