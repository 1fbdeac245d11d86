"""Tokenizer, chat templates and hermes tool calls.

* :class:`ChatTemplate` renders a Hugging Face chat template with jinja2 exactly as
  ``transformers.apply_chat_template`` does (sandboxed environment, ``trim_blocks`` and
  ``lstrip_blocks``, the ``loopcontrols`` extension, a ``tojson`` that does not HTML-escape,
  ``raise_exception`` and ``strftime_now``).
* :class:`ChatTokenizer` pairs it with a ``tokenizer.json`` loaded by ``tokenizers``.
* :func:`parse_tool_calls` extracts ``<tool_call>{json}</tool_call>`` blocks from generated text,
  returning structured calls and structured errors (never raising).
* :meth:`ChatTokenizer.tool_response_ids` gives the ids to append after an assistant turn that ended
  with ``<|im_end|>`` so that prompt + generated + appended ids equal the tokenization of the full
  re-rendered conversation (token-in, token-out; the agent never re-tokenizes a conversation).
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any, Optional, Union

import jinja2
from jinja2.ext import loopcontrols
from jinja2.sandbox import ImmutableSandboxedEnvironment
from tokenizers import Tokenizer

# The tool schema text of the reference's tool config (verl's sandbox-fusion tool config, as the SOD run
# used it). Every prompt renders it into the system block, so changing it changes what the model sees.
REFERENCE_TOOL_DESCRIPTION = "A tool for executing code."
REFERENCE_PARAMETER_DESCRIPTION = "The code to execute."


def code_interpreter_tool(tool: Any = None, *, name: Optional[str] = None, description: Optional[str] = None,
                          parameter_description: Optional[str] = None) -> dict:
    """The TIR agent's one tool as an OpenAI function schema (key order = what the template renders).

    ``tool``: a config section with ``name``, ``description`` and ``parameter_description`` (the
    ``tool`` section of :class:`sod_jax.config.Config`), or None for the reference's text; keyword
    arguments override either.
    """
    name = name or getattr(tool, "name", None) or "code_interpreter"
    description = description if description is not None else getattr(tool, "description", REFERENCE_TOOL_DESCRIPTION)
    if parameter_description is None:
        parameter_description = getattr(tool, "parameter_description", REFERENCE_PARAMETER_DESCRIPTION)
    return {
        "type": "function",
        "function": {
            "name": name,
            "description": description,
            "parameters": {
                "type": "object",
                "properties": {"code": {"type": "string", "description": parameter_description}},
                "required": ["code"],
            },
        },
    }


# The default schema (the reference's text), as rendered into the system prompt.
CODE_INTERPRETER_TOOL = code_interpreter_tool()


class ChatError(ValueError):
    """A tokenizer/template problem; the message names the file."""


# ---------------------------------------------------------------------------------------------
# Templates
# ---------------------------------------------------------------------------------------------


def _raise_exception(message: str) -> None:
    raise jinja2.exceptions.TemplateError(message)


def _tojson(x: Any, ensure_ascii: bool = False, indent: Optional[int] = None, separators=None,
            sort_keys: bool = False) -> str:
    return json.dumps(x, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)


def _strftime_now(fmt: str) -> str:
    return datetime.now().strftime(fmt)


class ChatTemplate:
    """A compiled jinja2 chat template with ``transformers``' rendering semantics."""

    def __init__(self, source: str, special_tokens: Optional[dict[str, Optional[str]]] = None):
        env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True, extensions=[loopcontrols])
        env.filters["tojson"] = _tojson
        env.globals["raise_exception"] = _raise_exception
        env.globals["strftime_now"] = _strftime_now
        self.source = source
        self.template = env.from_string(source)
        self.special_tokens = dict(special_tokens or {})

    def render(self, messages: list[dict], tools: Optional[list[dict]] = None, add_generation_prompt: bool = False,
               enable_thinking: bool = True, **extra: Any) -> str:
        """The conversation as the model sees it (a string)."""
        return self.template.render(messages=messages, tools=tools, add_generation_prompt=add_generation_prompt,
                                    enable_thinking=enable_thinking, **self.special_tokens, **extra)


def _token_text(tok: Any) -> Optional[str]:
    if tok is None or isinstance(tok, str):
        return tok
    if isinstance(tok, dict):
        return tok.get("content")
    return str(tok)


def load_template_source(tokenizer_config: Union[str, Path], tools: bool = False) -> str:
    """The chat template of a ``tokenizer_config.json`` (or a sibling ``chat_template.jinja``)."""
    path = Path(tokenizer_config)
    jinja_file = path.parent / "chat_template.jinja"
    tmpl = None
    if path.is_file():
        try:
            tmpl = json.loads(path.read_text()).get("chat_template")
        except json.JSONDecodeError as e:
            raise ChatError(f"{path}: not valid JSON ({e})") from None
    if tmpl is None and jinja_file.is_file():
        return jinja_file.read_text()
    if tmpl is None:
        raise ChatError(f"{path}: no chat_template (and no chat_template.jinja beside it)")
    if isinstance(tmpl, list):  # named templates: [{"name": ..., "template": ...}]
        named = {t["name"]: t["template"] for t in tmpl}
        key = "tool_use" if tools and "tool_use" in named else "default"
        if key not in named:
            raise ChatError(f"{path}: chat_template list has no '{key}' entry (has {sorted(named)})")
        return named[key]
    return tmpl


# ---------------------------------------------------------------------------------------------
# Tokenizer
# ---------------------------------------------------------------------------------------------


class ChatTokenizer:
    """``tokenizer.json`` (via ``tokenizers``) + chat template + the special ids the engine needs."""

    def __init__(self, tokenizer: Any, template: ChatTemplate, eos_token: str = "<|im_end|>",
                 pad_token: Optional[str] = "<|endoftext|>", source: str = "tokenizer"):
        self.tok = tokenizer
        self.template = template
        self.source = source
        self.eos_token = eos_token
        self.pad_token = pad_token
        self.eos_id = self._require_id(eos_token)
        self.pad_id = self._require_id(pad_token) if pad_token else self.eos_id
        # Generation stops on <|im_end|> and on <|endoftext|> when the vocabulary has them.
        stops = [self.eos_id] + [self.tok.token_to_id(t) for t in ("<|im_end|>", "<|endoftext|>")]
        self.stop_ids = sorted({i for i in stops if i is not None})

    def _require_id(self, token: str) -> int:
        i = self.tok.token_to_id(token)
        if i is None:
            raise ChatError(f"{self.source}: special token {token!r} is not in the vocabulary")
        return i

    @classmethod
    def from_dir(cls, path: Union[str, Path]) -> "ChatTokenizer":
        """Load ``tokenizer.json`` and ``tokenizer_config.json`` (or ``chat_template.jinja``) from a directory."""

        root = Path(path)
        tj = root / "tokenizer.json"
        if not tj.is_file():
            raise ChatError(f"{root}: tokenizer.json is missing")
        tc = root / "tokenizer_config.json"
        conf = json.loads(tc.read_text()) if tc.is_file() else {}
        special = {k: _token_text(conf.get(k)) for k in ("bos_token", "eos_token", "pad_token", "unk_token")}
        template = ChatTemplate(load_template_source(tc), special)
        return cls(Tokenizer.from_file(str(tj)), template, eos_token=special["eos_token"] or "<|im_end|>",
                   pad_token=special["pad_token"] or "<|endoftext|>", source=str(root))

    @property
    def vocab_size(self) -> int:
        return self.tok.get_vocab_size(with_added_tokens=True)

    def token_id(self, token: str) -> Optional[int]:
        return self.tok.token_to_id(token)

    def encode(self, text: str) -> list[int]:
        """Ids of ``text``; special tokens written in the text become their ids; nothing is added."""
        return self.tok.encode(text, add_special_tokens=False).ids

    def decode(self, ids: list[int], skip_special_tokens: bool = False) -> str:
        return self.tok.decode(list(ids), skip_special_tokens=skip_special_tokens)

    def render(self, messages: list[dict], tools: Optional[list[dict]] = None, add_generation_prompt: bool = False,
               enable_thinking: bool = True, **extra: Any) -> str:
        return self.template.render(messages, tools, add_generation_prompt, enable_thinking, **extra)

    def encode_chat(self, messages: list[dict], tools: Optional[list[dict]] = None, add_generation_prompt: bool = True,
                    enable_thinking: bool = True) -> list[int]:
        """Prompt ids of a conversation (the agent's starting point)."""
        return self.encode(self.render(messages, tools, add_generation_prompt, enable_thinking))

    def tool_response_text(self, contents: list[str], tools: Optional[list[dict]] = None,
                           enable_thinking: bool = True) -> str:
        """Text the template puts after an assistant turn's ``eos`` for these tool messages, up to and
        including the next assistant generation prompt."""
        # The dummy turn carries reasoning so templates that drop or add empty think blocks depending on
        # the turn's position (Qwen3's does) render it the same with and without tool messages after it.
        base = [{"role": "user", "content": "q"}, {"role": "assistant", "content": "<think>\nr\n</think>\n\na"}]
        before = self.render(base, tools)
        cut = before.rfind(self.eos_token)
        if cut < 0:
            raise ChatError(f"{self.source}: the chat template does not end assistant turns with {self.eos_token!r}")
        cut += len(self.eos_token)
        full = self.render(base + [{"role": "tool", "content": c} for c in contents], tools,
                           add_generation_prompt=True, enable_thinking=enable_thinking)
        if not full.startswith(before[:cut]):
            raise ChatError(f"{self.source}: the chat template renders earlier turns differently once a tool "
                            "message follows; token-in/token-out appending is impossible with it")
        return full[cut:]

    def tool_response_ids(self, contents: list[str], tools: Optional[list[dict]] = None,
                          enable_thinking: bool = True) -> list[int]:
        """Ids to append after a generated assistant turn (ending in ``eos``) for tool outputs ``contents``."""
        return self.encode(self.tool_response_text(contents, tools, enable_thinking))


# ---------------------------------------------------------------------------------------------
# Hermes tool calls
# ---------------------------------------------------------------------------------------------

_CALL_RE = re.compile(r"<tool_call>(.*?)</tool_call>", re.DOTALL)


@dataclass
class ToolCall:
    """One well-formed call: ``name`` and ``arguments`` (a dict)."""

    name: str
    arguments: dict
    raw: str = ""


@dataclass
class ToolCallError:
    """A malformed call. ``kind``: invalid_json | not_an_object | missing_name | missing_arguments |
    bad_arguments | unterminated."""

    kind: str
    message: str
    raw: str = ""


@dataclass
class ParsedTurn:
    """An assistant turn split into its text and tool calls, in order of appearance."""

    calls: list[ToolCall] = field(default_factory=list)
    errors: list[ToolCallError] = field(default_factory=list)
    content: str = ""  # the text outside <tool_call> blocks

    @property
    def has_calls(self) -> bool:
        return bool(self.calls or self.errors)


def _parse_one(raw: str) -> Union[ToolCall, ToolCallError]:
    body = raw.strip()
    try:
        obj = json.loads(body)
    except json.JSONDecodeError as e:
        return ToolCallError("invalid_json", f"tool call is not valid JSON: {e.msg} at position {e.pos}", raw)
    if not isinstance(obj, dict):
        return ToolCallError("not_an_object", f"tool call must be a JSON object, got {type(obj).__name__}", raw)
    name = obj.get("name")
    if not isinstance(name, str) or not name:
        return ToolCallError("missing_name", "tool call has no \"name\" string", raw)
    if "arguments" not in obj:
        return ToolCallError("missing_arguments", f"tool call to {name!r} has no \"arguments\"", raw)
    args = obj["arguments"]
    if isinstance(args, str):
        try:
            args = json.loads(args)
        except json.JSONDecodeError:
            return ToolCallError("bad_arguments", f"\"arguments\" of {name!r} is a string that is not JSON", raw)
    if not isinstance(args, dict):
        return ToolCallError("bad_arguments", f"\"arguments\" of {name!r} must be an object, got {type(args).__name__}", raw)
    return ToolCall(name, args, raw)


def parse_tool_calls(text: str) -> ParsedTurn:
    """Split generated text into content, calls and errors. Never raises."""
    out = ParsedTurn()
    pieces = []
    pos = 0
    for m in _CALL_RE.finditer(text):
        pieces.append(text[pos:m.start()])
        pos = m.end()
        res = _parse_one(m.group(1))
        (out.calls if isinstance(res, ToolCall) else out.errors).append(res)
    rest = text[pos:]
    if "<tool_call>" in rest:
        i = rest.index("<tool_call>")
        out.errors.append(ToolCallError("unterminated", "<tool_call> was opened but never closed with </tool_call>",
                                        rest[i:]))
        rest = rest[:i]
    pieces.append(rest)
    out.content = "".join(pieces).strip()
    return out


@dataclass
class ReferenceCall:
    """A call the reference's hermes parser accepts: ``name`` a string, ``arguments`` any JSON value."""

    name: str
    arguments: Any
    raw: str = ""


def parse_tool_calls_reference(text: str) -> list[ReferenceCall]:
    """The calls the reference (verl's ``HermesToolParser``) extracts from an assistant turn.

    No call at all unless the text holds both ``<tool_call>`` and ``</tool_call>``; each block must
    decode to a JSON object with a string ``name`` and an ``arguments`` key (any value). Blocks that
    do not are dropped without a trace, as the reference drops them.
    """
    if "<tool_call>" not in text or "</tool_call>" not in text:
        return []
    calls = []
    for m in _CALL_RE.finditer(text):
        try:
            obj = json.loads(m.group(1))
        except json.JSONDecodeError:
            continue
        if isinstance(obj, dict) and isinstance(obj.get("name"), str) and "arguments" in obj:
            calls.append(ReferenceCall(obj["name"], obj["arguments"], m.group(1)))
    return calls
