"""The demo's tokenizer: a small byte-level BPE with Qwen3's special tokens and chat format.

* Qwen3's pre-tokenizer regex, which isolates every digit (``\\p{N}``): BPE never merges across
  pre-tokens, so digits are always single tokens and copying a number is copying its digits.
* The special tokens ``<|endoftext|> <|im_start|> <|im_end|>`` are ids 0, 1, 2; the added tokens
  ``<tool_call> </tool_call> <tool_response> </tool_response> <think> </think>`` follow the learned
  vocabulary (the layout of the test tokenizer the chat code is tested with).
* The chat template is Qwen3's (same special tokens, ``<think>`` blocks, hermes ``<tool_call>`` JSON,
  tool outputs as ``<tool_response>`` blocks in a user turn) with the long tool preamble replaced by a
  short one that lists each tool as ``name(arg, ...)`` inside ``<tools></tools>``: every demo sequence starts with it, so it is
  kept to a few tokens.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Iterable

from tokenizers import AddedToken, Regex, Tokenizer, decoders, models, pre_tokenizers, trainers

from sod_jax.chat import ChatTemplate

QWEN_PRETOKENIZE = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*"
                    r"|\s*[\r\n]+|\s+(?!\S)|\s+")
SPECIAL = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
ADDED = ["<tool_call>", "</tool_call>", "<tool_response>", "</tool_response>", "<think>", "</think>"]

# Qwen3's chat template, with the tool preamble shortened (the rest is Qwen3's, unchanged).
CHAT_TEMPLATE = r"""{%- if tools %}
    {{- '<|im_start|>system\n' }}
    {%- if messages[0].role == 'system' %}
        {{- messages[0].content + '\n\n' }}
    {%- endif %}
    {{- "# Tools\n<tools>" }}
    {%- for tool in tools %}
        {%- set fn = tool.function if tool.function is defined else tool %}
        {{- "\n" + fn.name + "(" + (fn.parameters.properties | list | join(", ")) + ")" }}
    {%- endfor %}
    {{- "\n</tools><|im_end|>\n" }}
{%- else %}
    {%- if messages[0].role == 'system' %}
        {{- '<|im_start|>system\n' + messages[0].content + '<|im_end|>\n' }}
    {%- endif %}
{%- endif %}
{%- set ns = namespace(multi_step_tool=true, last_query_index=messages|length - 1) %}
{%- for message in messages[::-1] %}
    {%- set index = (messages|length - 1) - loop.index0 %}
    {%- if ns.multi_step_tool and message.role == "user" and message.content is string and not(message.content.startswith('<tool_response>') and message.content.endswith('</tool_response>')) %}
        {%- set ns.multi_step_tool = false %}
        {%- set ns.last_query_index = index %}
    {%- endif %}
{%- endfor %}
{%- for message in messages %}
    {%- if message.content is string %}
        {%- set content = message.content %}
    {%- else %}
        {%- set content = '' %}
    {%- endif %}
    {%- if (message.role == "user") or (message.role == "system" and not loop.first) %}
        {{- '<|im_start|>' + message.role + '\n' + content + '<|im_end|>' + '\n' }}
    {%- elif message.role == "assistant" %}
        {%- set reasoning_content = '' %}
        {%- if message.reasoning_content is string %}
            {%- set reasoning_content = message.reasoning_content %}
        {%- else %}
            {%- if '</think>' in content %}
                {%- set reasoning_content = content.split('</think>')[0].rstrip('\n').split('<think>')[-1].lstrip('\n') %}
                {%- set content = content.split('</think>')[-1].lstrip('\n') %}
            {%- endif %}
        {%- endif %}
        {%- if loop.index0 > ns.last_query_index %}
            {%- if loop.last or (not loop.last and reasoning_content) %}
                {{- '<|im_start|>' + message.role + '\n<think>\n' + reasoning_content.strip('\n') + '\n</think>\n\n' + content.lstrip('\n') }}
            {%- else %}
                {{- '<|im_start|>' + message.role + '\n' + content }}
            {%- endif %}
        {%- else %}
            {{- '<|im_start|>' + message.role + '\n' + content }}
        {%- endif %}
        {%- if message.tool_calls %}
            {%- for tool_call in message.tool_calls %}
                {%- if (loop.first and content) or (not loop.first) %}
                    {{- '\n' }}
                {%- endif %}
                {%- if tool_call.function %}
                    {%- set tool_call = tool_call.function %}
                {%- endif %}
                {{- '<tool_call>\n{"name": "' }}
                {{- tool_call.name }}
                {{- '", "arguments": ' }}
                {%- if tool_call.arguments is string %}
                    {{- tool_call.arguments }}
                {%- else %}
                    {{- tool_call.arguments | tojson }}
                {%- endif %}
                {{- '}\n</tool_call>' }}
            {%- endfor %}
        {%- endif %}
        {{- '<|im_end|>\n' }}
    {%- elif message.role == "tool" %}
        {%- if loop.first or (messages[loop.index0 - 1].role != "tool") %}
            {{- '<|im_start|>user' }}
        {%- endif %}
        {{- '\n<tool_response>\n' }}
        {{- content }}
        {{- '\n</tool_response>' }}
        {%- if loop.last or (messages[loop.index0 + 1].role != "tool") %}
            {{- '<|im_end|>\n' }}
        {%- endif %}
    {%- endif %}
{%- endfor %}
{%- if add_generation_prompt %}
    {{- '<|im_start|>assistant\n' }}
    {%- if enable_thinking is defined and enable_thinking is false %}
        {{- '<think>\n\n</think>\n\n' }}
    {%- endif %}
{%- endif %}"""


def tokenizer_config() -> dict:
    """``tokenizer_config.json`` contents (as Qwen3's: eos ``<|im_end|>``, pad ``<|endoftext|>``, no bos)."""
    return {"tokenizer_class": "PreTrainedTokenizerFast", "eos_token": "<|im_end|>", "pad_token": "<|endoftext|>",
            "bos_token": None, "unk_token": None, "add_bos_token": False, "clean_up_tokenization_spaces": False,
            "model_max_length": 4096, "chat_template": CHAT_TEMPLATE}


def train_tokenizer(texts: Iterable[str], out_dir: Path, vocab_size: int = 512) -> Path:
    """Train the BPE on ``texts`` (rendered demo conversations) and write ``tokenizer.json`` and
    ``tokenizer_config.json`` to ``out_dir``. The total vocabulary (added tokens included) is
    ``vocab_size``."""

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(QWEN_PRETOKENIZE), behavior="isolated"),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
    ])
    tok.decoder = decoders.ByteLevel()
    # Special tokens must never be split by the trainer: remove them from the corpus text.
    markers = SPECIAL + ADDED

    def clean(t: str) -> str:
        for m in markers:
            t = t.replace(m, "\n")
        return t

    trainer = trainers.BpeTrainer(vocab_size=vocab_size - len(ADDED), special_tokens=SPECIAL,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator((clean(t) for t in texts), trainer)
    tok.add_tokens([AddedToken(t, special=False, normalized=False) for t in ADDED])
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    tok.save(str(out_dir / "tokenizer.json"))
    (out_dir / "tokenizer_config.json").write_text(json.dumps(tokenizer_config(), indent=2) + "\n")
    return out_dir


def corpus_from_rows(sft_rows: list[dict]) -> list[str]:
    """The rendered expert conversations (the text the models are trained on)."""

    tmpl = ChatTemplate(CHAT_TEMPLATE, {"eos_token": "<|im_end|>", "pad_token": "<|endoftext|>"})
    return [tmpl.render(r["messages"], r["tools"]) for r in sft_rows]
