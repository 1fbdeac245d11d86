"""The shipped demo teacher and student: they load in transformers and greedy-decode the same tokens
as our engine on a held-out prompt; (slow) their held-out accuracy with real tool execution is in
the bands the demo relies on (teacher >= 85%, student 10-30%)."""

import json

import numpy as np
import pyarrow.parquet as pq
import pytest

from sod_jax.chat import CODE_INTERPRETER_TOOL, ChatTokenizer
from sod_jax.demo import DATA_DIR, STUDENT_DIR, TEACHER_DIR

MODELS = {"teacher": TEACHER_DIR, "student": STUDENT_DIR}
pytestmark = pytest.mark.skipif(not all((d / "model.safetensors").is_file() for d in MODELS.values()),
                                reason="the demo teacher/student are not in sod_jax/demo/assets yet "
                                       "(python -m sod_jax.demo train-model teacher|student)")


@pytest.fixture(scope="module")
def heldout():
    return pq.read_table(DATA_DIR / "heldout.parquet").to_pylist()


@pytest.mark.parametrize("name", list(MODELS))
def test_shipped_model_files(name):
    d = MODELS[name]
    for f in ("config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json"):
        assert (d / f).is_file(), f"{d / f} is missing"
    tok = ChatTokenizer.from_dir(d)
    cfg = json.loads((d / "config.json").read_text())
    assert cfg["vocab_size"] == tok.vocab_size and cfg["eos_token_id"] == tok.eos_id


@pytest.mark.parametrize("name", list(MODELS))
def test_greedy_tokens_equal_transformers(name, heldout):
    import torch
    from transformers import Qwen3ForCausalLM

    from sod_jax.models import load_pretrained
    from sod_jax.rollout import Engine, Request, SamplingParams

    d = MODELS[name]
    tok = ChatTokenizer.from_dir(d)
    prompt = tok.encode_chat(heldout[0]["prompt"], [CODE_INTERPRETER_TOOL])
    new = 40
    hf = Qwen3ForCausalLM.from_pretrained(str(d), torch_dtype=torch.float32, attn_implementation="eager").eval()
    with torch.no_grad():
        out = hf.generate(torch.tensor([prompt]), max_new_tokens=new, do_sample=False, eos_token_id=tok.stop_ids,
                          pad_token_id=tok.pad_id)
    theirs = out[0, len(prompt):].tolist()
    engine = Engine(load_pretrained(d, dtype="float32"), num_slots=1, max_len=len(prompt) + new + 2,
                    stop_ids=tok.stop_ids)
    ours = engine.generate([Request(prompt, new, SamplingParams(greedy=True), 0, 1)])[0].token_ids
    assert ours == theirs
    assert tok.decode(ours).startswith("<think>")  # a trained model, not noise


@pytest.mark.slow
def test_shipped_accuracies_with_real_tools(heldout):
    """Greedy, tools executed in the local sandbox, on held-out prompts 64..127: disjoint from the
    first 64, on which training picked its stopping checkpoint."""
    import asyncio

    from sod_jax.demo.train_models import HeldoutEval
    from sod_jax.models import load_pretrained

    rows = heldout[64:128]
    accs = {}
    for name, d in MODELS.items():
        tok = ChatTokenizer.from_dir(d)
        ev = HeldoutEval(load_pretrained(d, dtype="float32"), tok, rows)
        try:
            res = ev(ev.engine.params)
        finally:
            asyncio.run(ev.sandbox.close())
        accs[name] = res["acc"]
        assert res["tool_calls"] > 1.5  # the models really use the tool
    assert accs["teacher"] >= 0.85, accs
    assert 0.10 <= accs["student"] <= 0.30, accs
