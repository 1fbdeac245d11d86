"""``python -m sod_jax.generate`` end to end on a tiny checkpoint with our tokenizer files."""

import json
import shutil
import subprocess
import sys

import pytest
from conftest import make_hf_model


@pytest.fixture(scope="module")
def model_dir(tokenizer_dir, tmp_path_factory):
    from sod_jax.chat import ChatTokenizer

    tok = ChatTokenizer.from_dir(tokenizer_dir)
    d = tmp_path_factory.mktemp("chat_model")
    make_hf_model(seed=4, vocab_size=tok.vocab_size, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                  num_attention_heads=4, num_key_value_heads=2, head_dim=16, initializer_range=0.1).save_pretrained(d)
    for f in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(tokenizer_dir / f, d / f)
    return d


def run(*args):
    return subprocess.run([sys.executable, "-m", "sod_jax.generate", *args], capture_output=True, text=True)


def test_generate_greedy_matches_engine(model_dir):
    from sod_jax.chat import ChatTokenizer
    from sod_jax.models import load_pretrained
    from sod_jax.rollout import Engine, Request, SamplingParams, generate

    out = run("--model", str(model_dir), "--prompt", "What is 2+2?", "--greedy", "--max-new-tokens", "12",
              "--json", "--n", "2")
    assert out.returncode == 0, out.stderr
    rows = [json.loads(line) for line in out.stdout.splitlines()]
    assert len(rows) == 2 and rows[0]["text"] == rows[1]["text"]
    tok = ChatTokenizer.from_dir(model_dir)
    ids = tok.encode_chat([{"role": "user", "content": "What is 2+2?"}])
    ref, = generate(Engine(load_pretrained(model_dir), num_slots=1, max_len=len(ids) + 13, stop_ids=tok.stop_ids),
                    [Request(ids, 12, SamplingParams(greedy=True))])
    assert rows[0]["text"] == tok.decode(ref.token_ids)
    assert "tokens/s" in out.stderr


def test_generate_errors(model_dir, tmp_path):
    out = run("--model", str(tmp_path), "--prompt", "hi")
    assert out.returncode == 2 and "tokenizer.json is missing" in out.stderr
    out = run("--model", str(model_dir), "--prompt", "hi", "--top-p", "1.5")
    assert out.returncode == 2 and "top_p must be in (0, 1]" in out.stderr
    out = run("--model", str(model_dir), "--prompt", "hi", "--greedy", "--temperature", "0.5")
    assert out.returncode == 2 and "not allowed with argument" in out.stderr


def test_generate_with_tools_runs_the_agent_loop(model_dir):
    out = run("--model", str(model_dir), "--prompt", "What is 2+2?", "--tools", "--max-new-tokens", "20", "--json",
              "--seed", "1")
    assert out.returncode == 0, out.stderr
    (row,) = [json.loads(line) for line in out.stdout.splitlines()]
    assert row["turns"] >= 1 and row["finish_reason"] in ("stop", "length") and 0 < row["model_tokens"] <= 20
