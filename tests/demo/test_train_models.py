"""The demo SFT driver: the loss mask covers exactly the assistant messages' generated text, and
packing keeps segments apart with per-segment positions."""

import numpy as np
import pyarrow.parquet as pq

from sod_jax.chat import ChatTokenizer
from sod_jax.demo import DATA_DIR, TOKENIZER_DIR
from sod_jax.demo.train_models import _clean_messages, assistant_mask, pack


def _generated(msg):
    text = msg["content"]
    for c in msg.get("tool_calls") or []:
        f = c["function"]
        text += f'<tool_call>\n{{"name": "{f["name"]}", "arguments": {f["arguments"]}}}\n</tool_call>'
    return text + "<|im_end|>"


def test_mask_is_the_assistant_text():
    tok = ChatTokenizer.from_dir(TOKENIZER_DIR)
    rows = pq.read_table(DATA_DIR / "sft_train.parquet").slice(0, 5).to_pylist()
    for r in rows:
        msgs = _clean_messages(r["messages"])
        ids, mask = assistant_mask(tok, msgs, r["tools"])
        # runs of masked tokens, decoded, are the assistant messages as the model writes them
        runs, cur = [], []
        for i, m in zip(ids, mask):
            if m:
                cur.append(i)
            elif cur:
                runs.append(cur)
                cur = []
        if cur:
            runs.append(cur)
        expected = [_generated(m) for m in msgs if m["role"] == "assistant"]
        assert [tok.decode(x) for x in runs] == expected


def test_pack_segments_and_positions():
    seqs = [([5, 6, 7], [0, 1, 1]), ([8, 9], [1, 1]), ([3, 4, 5, 6], [0, 0, 1, 1])]
    out = pack(seqs, row_len=6, pad_id=0)
    assert out["input_ids"].tolist() == [[5, 6, 7, 8, 9, 0], [3, 4, 5, 6, 0, 0]]
    assert out["segment_ids"].tolist() == [[1, 1, 1, 2, 2, 0], [1, 1, 1, 1, 0, 0]]
    assert out["positions"].tolist() == [[0, 1, 2, 0, 1, 0], [0, 1, 2, 3, 0, 0]]
    # a segment's first token is never a target (nothing before it in its segment)
    assert out["loss_mask"].tolist() == [[0, 1, 1, 0, 1, 0], [0, 0, 1, 1, 0, 0]]
    assert np.all(out["loss_mask"][out["segment_ids"] == 0] == 0)
