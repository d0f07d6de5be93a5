"""`kdlab run` with the real SmolLM2-135M-Instruct teacher (integration tier; skips cleanly when the GGUF is absent):
3 GKD steps of a 6-layer student cut from it, 2 held-out prompts, 8 new tokens; the hf/ export reloads."""
import json
from pathlib import Path

import pytest
import yaml

transformers = pytest.importorskip("transformers")
pytest.importorskip("gguf")

from kdlab.cli import main  # noqa: E402
from kdlab.errors import KdlabError  # noqa: E402
from kdlab.seq import hf_load  # noqa: E402
from kdlab.store import Store  # noqa: E402

pytestmark = pytest.mark.integration

try:
    GGUF = hf_load.find_smollm2()
except KdlabError as error:
    pytest.skip(str(error), allow_module_level=True)
if GGUF is None:
    pytest.skip(f"{hf_load.SMOLLM2_FILE} not found; {hf_load.fetch_hint()}", allow_module_level=True)

PROMPTS = [{"prompt": "What does the Python function `len` do?", "completion": "Return the number of items."},
           {"prompt": "What does `abs` do in Python?", "completion": "Return the absolute value of the argument."},
           {"prompt": "Explain what `json.dumps` does.", "completion": "Serialize obj to a JSON formatted str."},
           {"prompt": "Explain what `os.getcwd` does.", "completion": "Return a string of the current directory."}]


def test_gkd_from_smollm2_runs_and_exports(tmp_path):
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text("".join(json.dumps(row) + "\n" for row in PROMPTS))
    cfg = {"name": "smollm2-tiny",
           "data": {"dataset": "prompts", "path": str(prompts), "tokenizer": "teacher", "chat_template": True,
                    "max_prompt_tokens": 64, "max_new_tokens": 8, "test_fraction": 0.5, "val_fraction": 0.0},
           "teacher": {"model": "hf_causal_lm", "bundled": "smollm2"},
           "student": {"init": "teacher", "keep_layers": 6},
           "method": {"name": "gkd", "on_policy_fraction": 1.0, "divergence": "jsd", "beta": 0.5},
           "train": {"steps": 3, "batch_size": 2, "optimizer": "adamw", "lr": 1e-5, "device": "cpu",
                     "threads": None}}
    path = tmp_path / "study.yaml"
    path.write_text(yaml.safe_dump(cfg))
    assert main(["--workspace", str(tmp_path / "ws"), "run", str(path), "--quiet"]) == 0
    (run,) = Store(tmp_path / "ws").runs(experiment="smollm2-tiny")
    assert run.status == "finished" and "gen/reverse_kl" in run.final and run.final["gen/length"] <= 8
    samples = (Path(run.run_dir) / "samples.jsonl").read_text().splitlines()
    assert len(samples) == 2
    model = transformers.AutoModelForCausalLM.from_pretrained(Path(run.run_dir) / "hf")
    assert model.config.num_hidden_layers == 6
