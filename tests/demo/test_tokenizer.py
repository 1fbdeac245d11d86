"""The shipped demo tokenizer: Qwen3 special tokens and chat format, single-token digits, renders equal
to transformers' apply_chat_template, token-in/token-out tool turns equal a re-render, and it is what
``python -m sod_jax.demo tokenizer`` makes from the shipped expert rows."""

import json

import pyarrow.parquet as pq
import pytest
from transformers import PreTrainedTokenizerFast

from sod_jax.chat import CODE_INTERPRETER_TOOL, ChatTokenizer
from sod_jax.data import load_rows
from sod_jax.demo import DATA_DIR, TOKENIZER_DIR
from sod_jax.demo.tokenizer import ADDED, SPECIAL, corpus_from_rows, train_tokenizer


@pytest.fixture(scope="module")
def ours():
    return ChatTokenizer.from_dir(TOKENIZER_DIR)


@pytest.fixture(scope="module")
def theirs():
    return PreTrainedTokenizerFast.from_pretrained(str(TOKENIZER_DIR))


@pytest.fixture(scope="module")
def rows():
    # raw parquet rows (tool-call arguments as the JSON text the model writes); parquet gives every
    # struct field to every message, so drop the null ones
    rs = pq.read_table(DATA_DIR / "sft_train.parquet").slice(0, 50).to_pylist()
    return [dict(r, messages=[{k: v for k, v in m.items() if v is not None} for m in r["messages"]]) for r in rs]


def test_special_tokens(ours, theirs):
    assert [ours.token_id(t) for t in SPECIAL] == [0, 1, 2]
    assert all(ours.token_id(t) is not None for t in ADDED)
    assert ours.eos_id == ours.token_id("<|im_end|>") == theirs.eos_token_id
    assert ours.pad_id == ours.token_id("<|endoftext|>") == theirs.pad_token_id


def test_digits_are_single_tokens(ours, rows):
    assert len(ours.encode("1234567890")) == 10
    text = ours.render(rows[0]["messages"], rows[0]["tools"])
    enc = ours.tok.encode(text, add_special_tokens=False)
    for (a, b) in enc.offsets:
        piece = text[a:b]
        if any(c.isdigit() for c in piece):
            assert len(piece) == 1, piece


def test_render_equals_transformers(ours, theirs, rows):
    for r in rows[:10]:
        for msgs, gen in ((r["messages"], False), (r["messages"][:1], True)):
            expected = theirs.apply_chat_template(msgs, tools=r["tools"], tokenize=False, add_generation_prompt=gen)
            assert ours.render(msgs, r["tools"], add_generation_prompt=gen) == expected
            assert ours.encode(expected) == theirs.encode(expected, add_special_tokens=False)
    prompt = ours.render(rows[0]["messages"][:1], [CODE_INTERPRETER_TOOL], add_generation_prompt=True)
    assert prompt.startswith("<|im_start|>system\n# Tools\n<tools>\ncode_interpreter(code)\n</tools><|im_end|>\n")


def _generated(msg):
    """The text the model writes for an assistant message, ending in <|im_end|>."""
    text = msg["content"]
    for c in msg.get("tool_calls") or []:
        f = c["function"]
        text += f'<tool_call>\n{{"name": "{f["name"]}", "arguments": {f["arguments"]}}}\n</tool_call>'
    return text + "<|im_end|>"


def test_token_in_token_out_equals_rerender(ours, rows):
    tools = [CODE_INTERPRETER_TOOL]
    for r in rows[:10]:
        msgs = r["messages"]
        ids = ours.encode_chat(msgs[:1], tools)
        for m in msgs[1:]:
            if m["role"] == "assistant":
                ids += ours.encode(_generated(m))
            else:
                ids += ours.tool_response_ids([m["content"]], tools)
        assert ids == ours.encode(ours.render(msgs, tools)[:-1])  # the render ends "<|im_end|>\n"


def test_shipped_tokenizer_is_reproducible(tmp_path):
    rs, _ = load_rows([DATA_DIR / "sft_train.parquet"], "sft")
    vocab = json.loads((TOKENIZER_DIR / "tokenizer.json").read_text())["model"]["vocab"]
    train_tokenizer(corpus_from_rows(rs), tmp_path, vocab_size=512)
    assert json.loads((tmp_path / "tokenizer.json").read_text()) == json.loads((TOKENIZER_DIR / "tokenizer.json").read_text())
    assert len(vocab) > 256
