"""Exports that load without this repository: trust_remote_code in a bare process, and lm-eval's `hf` model.

The venv has this repo pip-installed (editable), so a subprocess with a clean cwd and PYTHONPATH could still
`import model`. Each subprocess therefore starts with a meta_path hook that makes the repo's packages
unimportable, checks the hook works, and checks none of them was imported at the end.
"""

import argparse
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import REPO, small_model
from transformers import AutoModelForCausalLM

from data import tokenizer as tok
from model import GrokForCausalLM
from toolbox.remote_code import write_model_code

SHAKESPEARE = Path(__file__).resolve().parents[2] / "shared" / "data" / "tinyshakespeare.txt"  # ../shared/data

NO_REPO = """
import atexit, sys
class _NoRepo:
    tried = []
    def find_spec(self, name, path=None, target=None):
        if name.partition(".")[0] in ("model", "data", "train"):
            self.tried.append(name)  # remembered too: a caller could swallow the error
            raise ModuleNotFoundError(f"{name} is blocked: the export must load without the repository")
sys.meta_path.insert(0, _NoRepo())
try:
    import model
    raise SystemExit("the repo's model package is importable: this process would prove nothing")
except ModuleNotFoundError:
    _NoRepo.tried.clear()
atexit.register(lambda: _NoRepo.tried and print(f"FAIL: imported the repo: {_NoRepo.tried}", file=sys.stderr))
"""

LOAD = """
import sys
import torch
from transformers import AutoModelForCausalLM
export, ids_path, out_path, resaved = sys.argv[1:]
try:
    AutoModelForCausalLM.from_pretrained(export, trust_remote_code=False)
    raise SystemExit("custom code loaded without trust_remote_code")
except ValueError as refusal:
    assert "trust_remote_code=True" in str(refusal), refusal
loaded = AutoModelForCausalLM.from_pretrained(export, trust_remote_code=True)
assert type(loaded).__module__.startswith("transformers_modules."), type(loaded).__module__
with torch.no_grad():
    torch.save(loaded(torch.load(ids_path)).logits, out_path)
loaded.save_pretrained(resaved)  # transformers copies the code on again: a re-save stays self-contained
AutoModelForCausalLM.from_pretrained(resaved, trust_remote_code=True)
"""


def _run_without_repo(code: str, *args: str, cwd: Path, timeout: int) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PYTHON", "HF_", "TRANSFORMERS_"))}
    # HF_HOME in tmp: a fresh modules cache (no stale copy of the code) and datasets cache per test.
    env.update(HF_HOME=str(cwd / "hf"), HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1", TOKENIZERS_PARALLELISM="false")
    result = subprocess.run(
        [sys.executable, "-I", "-c", NO_REPO + code, *args],
        cwd=cwd,
        env=env,
        stdin=subprocess.DEVNULL,
        capture_output=True,
        text=True,
        timeout=timeout,
    )
    assert result.returncode == 0 and "FAIL: imported the repo" not in result.stderr, result.stderr[-4000:]
    return result


@pytest.mark.compat
@pytest.mark.distributed  # runs a command in a fresh interpreter
def test_export_loads_with_trust_remote_code_in_a_process_without_the_repo(tmp_path):
    export = tmp_path / "export"
    model = small_model()
    model.save_pretrained(export)
    write_model_code(export)
    copied = {p.name for p in export.glob("*.py")}
    assert copied == {"grok.py", "config.py", "attention.py", "moe.py"}
    assert all((export / name).read_bytes() == (REPO / "model" / name).read_bytes() for name in copied)
    assert json.loads((export / "config.json").read_text())["auto_map"] == {
        "AutoConfig": "config.GrokConfig",
        "AutoModelForCausalLM": "grok.GrokForCausalLM",
    }

    ids = torch.randint(0, 97, (2, 11))
    torch.save(ids, tmp_path / "ids.pt")
    _run_without_repo(
        LOAD,
        str(export),
        str(tmp_path / "ids.pt"),
        str(tmp_path / "logits.pt"),
        str(tmp_path / "resaved"),
        cwd=tmp_path,
        timeout=120,
    )
    with torch.no_grad():
        expected = model(ids).logits
    torch.testing.assert_close(torch.load(tmp_path / "logits.pt"), expected, rtol=0, atol=1e-6)
    assert (tmp_path / "resaved" / "moe.py").exists()
    # With `import model` the registered class still wins, no trust_remote_code needed.
    assert type(AutoModelForCausalLM.from_pretrained(export)) is GrokForCausalLM


def _bits_per_byte(model, tokenizer, docs) -> float:
    """What lm-eval's loglikelihood_rolling computes when each doc fits one window: every token scored
    after the bos prefix."""
    total_ll = 0.0
    for doc in docs:
        ids = torch.tensor([[tok.BOS_ID] + tokenizer.encode(doc, add_special_tokens=False)])
        with torch.no_grad():
            logprobs = model(ids[:, :-1]).logits.float().log_softmax(-1)
        total_ll += logprobs.gather(-1, ids[:, 1:, None]).sum().item()
    return -total_ll / sum(len(d.encode()) for d in docs) / math.log(2)


@pytest.mark.compat
def test_lm_eval_scores_an_export_on_a_local_perplexity_task(tmp_path):
    pytest.importorskip("lm_eval", reason="lm-eval is not installed (pip install lm-eval==0.4.13)")
    # the shared corpus where this checkout has it, else prose from the standard library (a clean CI clone)
    text = SHAKESPEARE.read_text() if SHAKESPEARE.exists() else Path(argparse.__file__).read_text()
    paragraphs = [p.strip() for p in text.split("\n\n")]
    docs = [p for p in paragraphs if 80 <= len(p) <= 300][:3]
    (tmp_path / "docs.jsonl").write_text("".join(json.dumps({"text": d}) + "\n" for d in docs))
    task = {
        "task": "shakespeare_ppl",
        "dataset_path": "json",
        "test_split": "train",
        "dataset_kwargs": {"data_files": str(tmp_path / "docs.jsonl")},
        "output_type": "loglikelihood_rolling",
        "doc_to_text": "",
        "doc_to_target": "{{text}}",
        "metric_list": [{"metric": m} for m in ("word_perplexity", "byte_perplexity", "bits_per_byte")],
        "metadata": {"version": 1.0},
    }
    (tmp_path / "tasks").mkdir()
    (tmp_path / "tasks" / "shakespeare_ppl.yaml").write_text(json.dumps(task))  # JSON is YAML

    export = tmp_path / "export"
    # 512 positions: every doc is one rolling window, so _bits_per_byte can check lm-eval's number exactly.
    model = small_model(vocab_size=tok.BYTE_VOCAB_SIZE, max_position_embeddings=512)
    model.save_pretrained(export)
    tok.save(tok.byte_tokenizer(), export)
    write_model_code(export)

    lm_eval_main = "import runpy; sys.argv[0] = 'lm_eval'; runpy.run_module('lm_eval', run_name='__main__')"
    _run_without_repo(
        lm_eval_main,
        "--model",
        "hf",
        "--model_args",
        f"pretrained={export},trust_remote_code=True,dtype=float32",
        "--tasks",
        "shakespeare_ppl",
        "--include_path",
        str(tmp_path / "tasks"),
        "--device",
        "cpu",
        "--batch_size",
        "1",
        "--output_path",
        str(tmp_path / "results"),
        cwd=tmp_path,
        timeout=300,
    )
    [results_file] = (tmp_path / "results").rglob("results_*.json")
    scores = json.loads(results_file.read_text())["results"]["shakespeare_ppl"]
    assert math.isfinite(scores["word_perplexity,none"]) and scores["word_perplexity,none"] > 1
    expected = _bits_per_byte(model, tok.load(export), docs)
    assert scores["bits_per_byte,none"] == pytest.approx(expected, rel=1e-5)
