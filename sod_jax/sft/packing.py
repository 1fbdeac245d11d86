"""SFT examples: chat-template rendering with an assistant-token loss mask, and sequence packing.

* :func:`tokenize_conversation` renders a conversation (with its tools) through the model's chat
  template (the renderer the agent uses) and marks the tokens of every assistant message: its think
  text, its text, its tool-call text and the closing ``<|im_end|>``. The ``<|im_start|>assistant\\n``
  header, the newline after ``<|im_end|>`` and all system, user and tool tokens are context only.
  The rendered text is cut at those span boundaries and each piece is tokenized on its own, which
  is exactly how the agent sees a conversation at rollout time (prompt ids up to the header, then
  the model's own tokens, then the tool response's ids), so training and sampling agree token by
  token.
* :func:`pack_rows` places conversations into rows of ``pack_length`` tokens (first fit, longest
  first): each conversation keeps its own positions (0, 1, ...) and a segment id, so attention never
  crosses from one conversation into another.
* :func:`build_batch` turns a pack plan into the step's fixed-shape arrays ``[A, R, L]``
  (A micro-batches of R rows of L tokens; unused micro-batches are all padding and the step skips them).

Mask convention: ``loss_mask[t] = 1`` when token ``t`` is a *target*, i.e. the loss includes
``-log p(ids[t] | ids[:t])``. The first assistant token is trained (predicted from the header's
newline); the token after ``<|im_end|>`` is not. (The reference's mask is shifted one token later:
it trains the token after each turn's end instead of the turn's first token.)
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, NamedTuple, Optional, Sequence

import numpy as np

ASSISTANT_HEADER = "<|im_start|>assistant\n"


class SFTDataError(ValueError):
    """A conversation that cannot be turned into a training example; the message names the row."""


@dataclass
class Example:
    """One tokenized conversation."""

    ids: np.ndarray  # [T] int32
    loss_mask: np.ndarray  # [T] int8, 1 = assistant token (a training target)
    index: int = -1  # the row's index in its file(s)
    truncated: bool = False

    def __len__(self) -> int:
        return int(self.ids.shape[0])


def assistant_spans(text: str, eos_token: str = "<|im_end|>", header: str = ASSISTANT_HEADER) -> list[tuple[int, int]]:
    """Character spans ``[start, end)`` of the assistant turns in a rendered conversation: from just
    after each ``header`` through the first ``eos_token`` after it (included)."""
    spans = []
    pos = 0
    while True:
        h = text.find(header, pos)
        if h < 0:
            return spans
        start = h + len(header)
        e = text.find(eos_token, start)
        if e < 0:
            raise SFTDataError(f"an assistant turn at character {h} is not closed by {eos_token!r}")
        spans.append((start, e + len(eos_token)))
        pos = e + len(eos_token)


def tokenize_conversation(tokenizer: Any, messages: Sequence[dict], tools: Optional[Sequence[dict]] = None, *,
                          enable_thinking: bool = True, index: int = -1) -> Example:
    """Render ``messages`` (and ``tools``) with ``tokenizer``'s chat template and tokenize it with
    the assistant-token loss mask. ``tokenizer`` is a :class:`sod_jax.chat.ChatTokenizer`."""
    where = f"row {index}" if index >= 0 else "conversation"
    if not messages:
        raise SFTDataError(f"{where}: `messages` is empty")
    n_assistant = sum(1 for m in messages if isinstance(m, dict) and m.get("role") == "assistant")
    if n_assistant == 0:
        raise SFTDataError(f"{where}: no assistant message, nothing to train on")
    for i, m in enumerate(messages):
        content = m.get("content") if isinstance(m, dict) else None
        if isinstance(content, str) and (ASSISTANT_HEADER in content or tokenizer.eos_token in content):
            raise SFTDataError(f"{where}: message {i} contains the template's control text "
                               f"({ASSISTANT_HEADER!r} or {tokenizer.eos_token!r}); the loss mask would be ambiguous")
    try:
        text = tokenizer.render(list(messages), list(tools) if tools else None, add_generation_prompt=False,
                                enable_thinking=enable_thinking)
    except Exception as e:  # jinja errors (raise_exception in the template, bad message shapes)
        raise SFTDataError(f"{where}: the chat template cannot render it: {type(e).__name__}: {e}") from None
    try:
        spans = assistant_spans(text, tokenizer.eos_token)
    except SFTDataError as e:
        raise SFTDataError(f"{where}: {e}") from None
    if len(spans) != n_assistant:
        raise SFTDataError(f"{where}: {n_assistant} assistant messages but the rendering has {len(spans)} "
                           f"{ASSISTANT_HEADER!r} headers; the chat template is not Qwen3-style")
    # OpenAI's fine-tuning layout: an assistant message with "weight": 0 is context, not a target
    # (e.g. a deliberately wrong step the model should learn to recover from, not to make).
    trained = []
    for i, m in enumerate(messages):
        if isinstance(m, dict) and m.get("role") == "assistant":
            weight = m.get("weight")
            if weight not in (None, 0, 1):
                raise SFTDataError(f"{where}: message {i} has weight {weight!r}; an assistant message's weight "
                                   "is 0 (context only) or 1 (trained, the default)")
            trained.append(weight != 0)
    if not any(trained):
        raise SFTDataError(f"{where}: every assistant message has weight 0, nothing to train on")
    pieces, flags, pos = [], [], 0
    for (start, end), train in zip(spans, trained):
        pieces += [text[pos:start], text[start:end]]
        flags += [0, int(train)]
        pos = end
    pieces.append(text[pos:])
    flags.append(0)
    ids, mask = [], []
    for piece, flag in zip(pieces, flags):
        if not piece:
            continue
        toks = tokenizer.encode(piece)
        ids += toks
        mask += [flag] * len(toks)
    return Example(np.asarray(ids, np.int32), np.asarray(mask, np.int8), index)


def fit_length(ex: Example, max_length: int, overlong: str) -> Optional[Example]:
    """``ex`` if it fits; else None (``drop``) or its first ``max_length`` tokens (``truncate``)."""
    if len(ex) <= max_length:
        return ex
    if overlong == "drop":
        return None
    return Example(ex.ids[:max_length], ex.loss_mask[:max_length], ex.index, truncated=True)


# ---------------------------------------------------------------------------------------------
# Packing
# ---------------------------------------------------------------------------------------------


def pack_rows(lengths: Sequence[int], pack_length: int) -> list[list[int]]:
    """First-fit-decreasing bin packing: lists of indices into ``lengths`` whose sums are <= ``pack_length``.
    Deterministic (ties keep input order); each row lists its items in input order."""
    order = sorted(range(len(lengths)), key=lambda i: (-lengths[i], i))
    rows: list[list[int]] = []
    room: list[int] = []
    for i in order:
        n = lengths[i]
        if n > pack_length:
            raise ValueError(f"sequence of {n} tokens does not fit a row of {pack_length}")
        for r, free in enumerate(room):
            if n <= free:
                rows[r].append(i)
                room[r] -= n
                break
        else:
            rows.append([i])
            room.append(pack_length - n)
    return [sorted(r) for r in rows]


class SFTBatch(NamedTuple):
    """The arrays of one optimizer step. A micro-batches of R packed rows of L tokens."""

    input_ids: np.ndarray  # [A, R, L] int32 (0 on padding)
    positions: np.ndarray  # [A, R, L] int32, restart at 0 in every segment
    segment_ids: np.ndarray  # [A, R, L] int32, 1.. per conversation in its row, 0 = padding
    loss_mask: np.ndarray  # [A, R, L] int32, 1 = target token (never the first token of a segment)


def build_batch(examples: Sequence[Example], rows: Sequence[Sequence[int]], micro_batches: int, rows_per_micro: int,
                pack_length: int, pad_id: int = 0) -> SFTBatch:
    """Fill ``[micro_batches, rows_per_micro, pack_length]`` arrays from a pack plan over ``examples``."""
    n_rows = micro_batches * rows_per_micro
    if len(rows) > n_rows:
        raise ValueError(f"{len(rows)} packed rows do not fit {micro_batches} x {rows_per_micro}")
    shape = (n_rows, pack_length)
    ids = np.full(shape, pad_id, np.int32)
    pos = np.zeros(shape, np.int32)
    seg = np.zeros(shape, np.int32)
    mask = np.zeros(shape, np.int32)
    for r, members in enumerate(rows):
        off = 0
        for s, i in enumerate(members, start=1):
            ex = examples[i]
            n = len(ex)
            ids[r, off:off + n] = ex.ids
            pos[r, off:off + n] = np.arange(n)
            seg[r, off:off + n] = s
            mask[r, off:off + n] = ex.loss_mask
            mask[r, off] = 0  # a segment's first token is never predicted from the previous segment
            off += n
    split = lambda a: a.reshape(micro_batches, rows_per_micro, pack_length)  # noqa: E731
    return SFTBatch(split(ids), split(pos), split(seg), split(mask))
