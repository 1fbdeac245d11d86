"""The per-turn tool outputs the RL loop writes into step_weights.jsonl samples (what the demo's
compare reads to tell which tool step went wrong)."""

from types import SimpleNamespace

from sod_jax.chat import CODE_INTERPRETER_TOOL, ChatTokenizer
from sod_jax.demo import TOKENIZER_DIR
from sod_jax.rl.rollouts import turn_tool_outputs


def test_turn_tool_outputs_follow_each_assistant_turn():
    tok = ChatTokenizer.from_dir(TOKENIZER_DIR)
    tools = [CODE_INTERPRETER_TOOL]
    call = '<tool_call>\n{"name": "code_interpreter", "arguments": {"code": "print(1+2)"}}\n</tool_call><|im_end|>'
    turn1 = tok.encode("<think>\nx1\n</think>\n\n" + call)
    resp1 = tok.tool_response_ids(["863"], tools)
    turn2 = tok.encode(call)
    resp2 = tok.tool_response_ids(["1380", "7"], tools)  # two calls in one turn
    turn3 = tok.encode("\\boxed{1380}<|im_end|>")
    ids, spans = [], []
    for piece, is_turn in ((turn1, True), (resp1, False), (turn2, True), (resp2, False), (turn3, True)):
        if is_turn:
            spans.append((len(ids), len(ids) + len(piece)))
        ids += piece
    traj = SimpleNamespace(response_ids=ids, turn_spans=spans)
    assert turn_tool_outputs(tok, traj) == ["863", "1380\n7", None]
    assert turn_tool_outputs(tok, traj, max_chars=2) == ["86", "13", None]
