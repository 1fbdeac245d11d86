"""Doubles at the agent's generation boundary (the ``TurnPolicy`` protocol of
``sod_jax.rollout.agent``): scripted assistant turns instead of a model."""

from __future__ import annotations

import json
from typing import Callable, Sequence, Union

Script = Sequence[str]  # one sample's assistant turns, in order (each emitted then <|im_end|>)


def turn(think: str, content: str, *codes: str, raw_calls: Sequence[str] = ()) -> str:
    """An assistant turn as the Qwen3 template renders it (what a model emits before <|im_end|>)."""
    text = f"<think>\n{think}\n</think>\n\n{content}"
    calls = [json.dumps({"name": "code_interpreter", "arguments": {"code": c}}) for c in codes] + list(raw_calls)
    for i, c in enumerate(calls):
        text += ("\n" if (i == 0 and content) or i > 0 else "") + f"<tool_call>\n{c}\n</tool_call>"
    return text


class ScriptedPolicy:
    """Emits given assistant turns (text, then <|im_end|>), honouring each sample's token budget.

    ``scripts`` is either a list of per-sample scripts, handed out in start order, or a function
    ``(prompt_text, j) -> script`` for sample j of a prompt. Records what the agent did:
    ``started`` ``[(label(prompt_text), seed)]`` and ``appended`` (handle -> tool-turn token ids)."""

    def __init__(self, tok, scripts: Union[Sequence[Script], Callable[[str, int], Script]], capacity: int = 4,
                 logprob: float = -0.5, label: Callable[[str], object] = lambda text: text):
        self.tok, self.capacity, self.logprob, self.label = tok, capacity, logprob, label
        self.scripts = scripts if callable(scripts) else list(scripts)
        self.state = {}  # handle -> [turns left, budget, pending?]
        self.appended, self.started = {}, []
        self.next_handle = 0

    def start(self, prompt_ids, n, seed, budget):
        text = self.tok.decode(prompt_ids)
        self.started.append((self.label(text), seed))
        handles = []
        for j in range(n):
            script = self.scripts(text, j) if callable(self.scripts) else self.scripts.pop(0)
            h, self.next_handle = self.next_handle, self.next_handle + 1
            self.state[h] = [list(script), budget, True]
            self.appended[h] = []
            handles.append(h)
        return handles

    def busy(self):
        return any(st[2] for st in self.state.values())

    async def advance(self):
        out = {}
        for h, st in self.state.items():
            if not st[2]:
                continue
            st[2] = False
            ids = self.tok.encode(st[0].pop(0)) + [self.tok.eos_id]
            if len(ids) > st[1]:
                out[h] = (ids[: st[1]], [self.logprob] * st[1], "length")
            else:
                out[h] = (ids, [self.logprob] * len(ids), "stop")
        return out

    def append(self, handle, token_ids, budget):
        self.appended[handle].append(list(token_ids))
        self.state[handle][1] = budget
        self.state[handle][2] = True

    def release(self, handle):
        self.state.pop(handle)
