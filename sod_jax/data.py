"""Rows, prompt templates, length filtering and the grain prompt loader.

Three row kinds are read from parquet (pyarrow), jsonl (one JSON object a line) or JSON-array files:

* ``rl`` (Open-AgentRL-30K layout) and ``eval`` (Open-AgentRL-Eval layout): columns ``data_source``
  (str), ``prompt`` (list of ``{role, content}``), ``reward_model`` (``{"ground_truth": ...}``) and
  ``extra_info`` (mapping, optional). ``reward_model``, ``extra_info``, ``prompt`` and a code source's
  ground truth may be JSON strings (LiveCodeBench rows carry them so); they are parsed. Normalised to
  ``{"data_source", "prompt", "ground_truth", "extra_info", "index"}``.
* ``sft``: ``messages`` (roles system/user/assistant/tool; assistant messages may carry
  ``tool_calls``) and ``tools`` (OpenAI schemas, a list or a JSON string; optional). Normalised to
  ``{"messages", "tools", "index"}``.

``index`` is the row's position in the concatenation of the files (stable across runs).

A malformed row raises :class:`DataError` naming file, row and column, or, with
``on_bad_row="skip"``, is skipped and counted in the returned stats.
"""

from __future__ import annotations

import json
import sys
from collections import Counter
from pathlib import Path
from typing import Any, Iterable, Iterator, Literal, Mapping, Optional, Sequence, Union

import grain
import jinja2

from sod_jax import paths
from sod_jax.chat import CODE_INTERPRETER_TOOL
from sod_jax.rewards.registry import BUILTIN_SOURCES, check_sources, source_map

PROMPTS_DIR = Path(__file__).resolve().parents[1] / "configs" / "prompts"
ROLES = ("system", "user", "assistant", "tool")
RowKind = Literal["rl", "sft", "eval"]


class DataError(ValueError):
    """A data problem the user must fix; the message names the file, row and column."""


class _BadRow(Exception):
    def __init__(self, column: str, what: str):
        super().__init__(what)
        self.column, self.what = column, what


# ---------------------------------------------------------------------------------------------
# Reading files
# ---------------------------------------------------------------------------------------------


def read_records(path: Union[str, Path]) -> list[dict]:
    """All records of one parquet or jsonl file as plain Python dicts (columns -> values). ``path``
    may be a ``gs://`` URL (read through :mod:`sod_jax.paths`)."""
    path = paths.as_path(path)
    if not paths.is_file(path):
        raise DataError(f"data file '{path}' does not exist")
    suffix = path.suffix.lower()
    if suffix == ".parquet":
        import pyarrow.parquet as pq

        try:
            if paths.is_url(path):
                with path.open("rb") as f:
                    return pq.read_table(f).to_pylist()
            return pq.read_table(path).to_pylist()
        except Exception as e:  # pyarrow raises several types for a broken file
            raise DataError(f"{path}: not a readable parquet file ({type(e).__name__}: {e})") from None
    if suffix == ".json" and path.read_text().lstrip().startswith("["):  # one JSON array of records
        try:
            recs = json.loads(path.read_text())
        except json.JSONDecodeError as e:
            raise DataError(f"{path}: not valid JSON ({e})") from None
        bad = next((i for i, r in enumerate(recs) if not isinstance(r, dict)), None)
        if bad is not None:
            raise DataError(f"{path}: record {bad} must be a JSON object, got {type(recs[bad]).__name__}")
        return recs
    if suffix in (".jsonl", ".json"):
        out = []
        with path.open() as f:
            for i, line in enumerate(f):
                if not line.strip():
                    continue
                try:
                    rec = json.loads(line)
                except json.JSONDecodeError as e:
                    raise DataError(f"{path}: line {i + 1} is not valid JSON ({e})") from None
                if not isinstance(rec, dict):
                    raise DataError(f"{path}: line {i + 1} must be a JSON object, got {type(rec).__name__}")
                out.append(rec)
        return out
    raise DataError(f"data file '{path}': unsupported format {suffix!r} (use .parquet, .jsonl or a .json array)")


def _maybe_json(value: Any, column: str, want: type) -> Any:
    """``value`` parsed from a JSON string when it is one and ``want`` is not str."""
    if isinstance(value, str) and want is not str:
        try:
            value = json.loads(value)
        except json.JSONDecodeError as e:
            raise _BadRow(column, f"is a string that is not valid JSON ({e.msg} at char {e.pos})") from None
    return value


def _messages(value: Any, column: str, sft: bool) -> list[dict]:
    value = _maybe_json(value, column, list)
    if value is None:
        raise _BadRow(column, "is missing")
    if not isinstance(value, (list, tuple)):
        raise _BadRow(column, f"must be a list of {{role, content}} messages, got {type(value).__name__}")
    if not value:
        raise _BadRow(column, "is empty")
    out = []
    for j, m in enumerate(value):
        where = f"{column}[{j}]"
        if not isinstance(m, dict):
            raise _BadRow(where, f"must be a {{role, content}} mapping, got {type(m).__name__}")
        role = m.get("role")
        if role not in ROLES:
            raise _BadRow(f"{where}.role", f"must be one of {', '.join(ROLES)}, got {role!r}")
        # parquet structs give every message every field (None where absent): drop the Nones
        msg = {k: v for k, v in m.items() if v is not None}
        content = msg.get("content")
        if content is None:
            if not (sft and msg.get("tool_calls")):
                raise _BadRow(f"{where}.content", "is missing")
            msg["content"] = ""
        elif not isinstance(content, str):
            raise _BadRow(f"{where}.content", f"must be a string, got {type(content).__name__}")
        if "tool_calls" in msg:
            calls = _maybe_json(msg["tool_calls"], f"{where}.tool_calls", list)
            if not isinstance(calls, list) or not all(isinstance(c, dict) for c in calls):
                raise _BadRow(f"{where}.tool_calls", "must be a list of tool-call mappings")
            msg["tool_calls"] = [_tool_call(c, f"{where}.tool_calls[{k}]") for k, c in enumerate(calls)]
        out.append(msg)
    if not sft and not any(m["content"].strip() for m in out):
        raise _BadRow(column, "has no non-empty message content")
    return out


def _drop_nones(x: Any) -> Any:
    """Mappings without None values, recursively: parquet structs give every record every field of the
    column's union type (None where a record lacks it), which a JSON schema or a call's arguments must
    not carry."""
    if isinstance(x, dict):
        return {k: _drop_nones(v) for k, v in x.items() if v is not None}
    if isinstance(x, list):
        return [_drop_nones(v) for v in x]
    return x


def _tool_call(call: dict, where: str) -> dict:
    call = {k: v for k, v in call.items() if v is not None}
    fn = call.get("function", call)
    if not isinstance(fn, dict) or not isinstance(fn.get("name"), str):
        raise _BadRow(where, "must hold function.name (a string)")
    args = fn.get("arguments")
    if isinstance(args, str):  # templates render strings as-is and mappings with tojson
        try:
            args = json.loads(args)
        except json.JSONDecodeError:
            pass
    if isinstance(args, dict):
        args = _drop_nones(args)
    return {"type": call.get("type", "function"), "function": {"name": fn["name"], "arguments": args or {}}}


def _rl_row(rec: dict, prompt_key: str, sources: Mapping[str, str]) -> dict:
    src = rec.get("data_source")
    if not isinstance(src, str) or not src:
        raise _BadRow("data_source", "is missing" if src is None else f"must be a non-empty string, got {src!r}")
    if prompt_key not in rec:
        raise _BadRow(prompt_key, "is missing")
    prompt = _messages(rec[prompt_key], prompt_key, sft=False)
    rm = _maybe_json(rec.get("reward_model"), "reward_model", dict)
    if rm is None:
        raise _BadRow("reward_model", "is missing")
    if not isinstance(rm, dict):
        raise _BadRow("reward_model", f"must be a mapping with ground_truth, got {type(rm).__name__}")
    if rm.get("ground_truth") is None:
        raise _BadRow("reward_model.ground_truth", "is missing")
    gt = _ground_truth(rm["ground_truth"], sources.get(src))
    extra = _maybe_json(rec.get("extra_info"), "extra_info", dict)
    if extra is None:
        extra = {}
    if not isinstance(extra, dict):
        raise _BadRow("extra_info", f"must be a mapping, got {type(extra).__name__}")
    return {"data_source": src, "prompt": prompt, "ground_truth": gt, "extra_info": extra}


def _ground_truth(gt: Any, scorer: Optional[str]) -> Any:
    col = "reward_model.ground_truth"
    if scorer == "code":  # a JSON string or a mapping of inputs, outputs and optional fn_name
        gt = _maybe_json(gt, col, dict)
        if not isinstance(gt, dict):
            raise _BadRow(col, f"must be a mapping (or JSON object) of inputs/outputs, got {type(gt).__name__}")
        ins, outs = gt.get("inputs"), gt.get("outputs")
        if not isinstance(ins, list) or not isinstance(outs, list):
            raise _BadRow(col, "must hold lists 'inputs' and 'outputs'")
        if len(ins) != len(outs) or not ins:
            raise _BadRow(col, f"needs as many inputs as outputs (>= 1), got {len(ins)} and {len(outs)}")
        if gt.get("fn_name") is not None and not isinstance(gt["fn_name"], str):
            raise _BadRow(f"{col}.fn_name", "must be a string")
        return gt
    if isinstance(gt, bool) or not isinstance(gt, (str, int, float)):
        if isinstance(gt, list) and len(gt) == 1 and isinstance(gt[0], (str, int)):
            return str(gt[0])  # some math sets wrap the answer in a one-element list
        raise _BadRow(col, f"must be a string (the answer), got {type(gt).__name__}")
    if isinstance(gt, float) and gt.is_integer():
        gt = int(gt)
    gt = str(gt)
    if not gt.strip():
        raise _BadRow(col, "is empty")
    return gt


def _sft_row(rec: dict) -> dict:
    if "messages" not in rec:
        raise _BadRow("messages", "is missing")
    msgs = _messages(rec["messages"], "messages", sft=True)
    if not any(m["role"] == "assistant" for m in msgs):
        raise _BadRow("messages", "has no assistant message (nothing to train on)")
    tools = _maybe_json(rec.get("tools"), "tools", list)
    if tools is not None and (not isinstance(tools, list) or not all(isinstance(t, dict) for t in tools)):
        raise _BadRow("tools", "must be a list of tool schemas (or a JSON string of one)")
    return {"messages": msgs, "tools": _drop_nones(tools) or None}


def load_rows(files: Union[str, Path, Sequence[Union[str, Path]]], kind: RowKind,
              on_bad_row: Literal["error", "skip"] = "error", *, prompt_key: str = "prompt",
              sources: Optional[Mapping[str, str]] = None) -> tuple[list[dict], dict]:
    """Read and normalise the rows of ``files`` (parquet / jsonl).

    ``sources`` (``reward.sources``) adds data_source -> scorer mappings to the built-in ones; rows of
    ``code`` sources get their ground truth parsed and checked. Returns ``(rows, stats)`` with stats
    ``{"files", "rows_read", "rows", "bad_rows", "bad_by_column"}``.
    """
    if kind not in ("rl", "sft", "eval"):
        raise ValueError(f"kind must be 'rl', 'sft' or 'eval', got {kind!r}")
    if on_bad_row not in ("error", "skip"):
        raise ValueError(f"on_bad_row must be 'error' or 'skip', got {on_bad_row!r}")
    if isinstance(files, (str, Path)):
        files = [files]
    if not files:
        raise DataError(f"no {kind} data files given")
    smap = source_map(sources) if kind != "sft" else dict(BUILTIN_SOURCES)
    rows, bad, read = [], Counter(), 0
    for path in files:
        for i, rec in enumerate(read_records(path)):
            read += 1
            try:
                row = _sft_row(rec) if kind == "sft" else _rl_row(rec, prompt_key, smap)
            except _BadRow as e:
                if on_bad_row == "error":
                    raise DataError(f"{path}: row {i}, column '{e.column}': {e.what} (fix the row, or set "
                                    "data.on_bad_row: skip to skip and count such rows)") from None
                bad[e.column] += 1
                continue
            row["index"] = read - 1
            rows.append(row)
    stats = {"files": [str(f) for f in files], "rows_read": read, "rows": len(rows),
             "bad_rows": sum(bad.values()), "bad_by_column": dict(bad)}
    return rows, stats


# ---------------------------------------------------------------------------------------------
# Prompt templates
# ---------------------------------------------------------------------------------------------


def template_path(name_or_file: str) -> Path:
    """A template name (``configs/prompts/<name>.jinja``) or the path of a user's template file."""
    p = Path(name_or_file)
    if p.suffix or "/" in name_or_file:
        if not p.is_file():
            raise DataError(f"prompt template file '{p}' does not exist")
        return p
    p = PROMPTS_DIR / f"{name_or_file}.jinja"
    if not p.is_file():
        known = sorted(q.stem for q in PROMPTS_DIR.glob("*.jinja"))
        raise DataError(f"no prompt template named {name_or_file!r} (known: {', '.join(known)}; or give a "
                        "path to a .jinja file)")
    return p


class PromptTemplates:
    """Per-``data_source`` jinja2 templates that turn a row's problem into the user message.

    A template sees ``problem`` (the content of the row's last user message), ``data_source`` and
    ``extra_info``; its render (surrounding whitespace stripped) replaces that message's content. The
    row's other messages stay as they are. Rows whose source has no template pass through unchanged.
    """

    def __init__(self, mapping: Optional[Mapping[str, str]] = None):
        env = jinja2.Environment(undefined=jinja2.StrictUndefined, keep_trailing_newline=False)
        self.files: dict[str, Path] = {}
        self.templates: dict[str, jinja2.Template] = {}
        for src, name in (mapping or {}).items():
            path = template_path(name)
            try:
                self.templates[src] = env.from_string(path.read_text())
            except jinja2.TemplateSyntaxError as e:
                raise DataError(f"prompt template '{path}' (data_source {src!r}): line {e.lineno}: {e.message}") from None
            self.files[src] = path

    @classmethod
    def from_config(cls, data_cfg: Any) -> "PromptTemplates":
        return cls(getattr(data_cfg, "prompt_templates", None) or {})

    def apply(self, row: dict) -> list[dict]:
        """The prompt messages of ``row`` after its source's template (a new list; ``row`` untouched)."""
        msgs = [dict(m) for m in row["prompt"]]
        tmpl = self.templates.get(row["data_source"])
        if tmpl is None:
            return msgs
        users = [i for i, m in enumerate(msgs) if m["role"] == "user"]
        if not users:
            raise DataError(f"row {row.get('index')} ({row['data_source']}): no user message to template")
        k = users[-1]
        try:
            text = tmpl.render(problem=msgs[k]["content"], data_source=row["data_source"],
                               extra_info=row.get("extra_info") or {})
        except jinja2.UndefinedError as e:
            raise DataError(f"prompt template '{self.files[row['data_source']]}' on row {row.get('index')}: "
                            f"{e.message}") from None
        msgs[k]["content"] = text.strip()
        return msgs

    def apply_rows(self, rows: Iterable[dict]) -> list[dict]:
        """Rows with their ``prompt`` replaced by :meth:`apply`'s messages."""
        return [{**r, "prompt": self.apply(r)} for r in rows]


# ---------------------------------------------------------------------------------------------
# Length filter
# ---------------------------------------------------------------------------------------------


def prompt_lengths(rows: Sequence[dict], tokenizer: Any, tools: Optional[list[dict]],
                   enable_thinking: bool = True) -> list[int]:
    """Token length of each row's prompt as the agent encodes it: chat template with the tool system
    block and the generation prompt (``ChatTokenizer.encode_chat``)."""
    texts = [tokenizer.render(r["prompt"], tools, add_generation_prompt=True, enable_thinking=enable_thinking)
             for r in rows]
    inner = getattr(tokenizer, "tok", None)
    if inner is not None and hasattr(inner, "encode_batch"):  # one Rust call for the whole set
        return [len(e.ids) for e in inner.encode_batch(texts, add_special_tokens=False)]
    return [len(tokenizer.encode(t)) for t in texts]


def filter_by_length(rows: Sequence[dict], tokenizer: Any, max_len: int, tools: Optional[list[dict]],
                     enable_thinking: bool = True) -> tuple[list[dict], int]:
    """Rows whose prompt (incl. the tool system block, see :func:`prompt_lengths`) has at most
    ``max_len`` tokens, and how many were dropped."""
    lengths = prompt_lengths(rows, tokenizer, tools, enable_thinking)
    kept = [r for r, n in zip(rows, lengths) if n <= max_len]
    return kept, len(rows) - len(kept)


def load_prompt_rows(files: Union[str, Path, Sequence[Union[str, Path]]], data_cfg: Any, tokenizer: Any, *,
                     kind: Literal["rl", "eval"] = "rl", reward_cfg: Any = None, tools: Optional[list[dict]] = None,
                     enable_thinking: bool = True) -> tuple[list[dict], dict]:
    """The RL / eval prompt pipeline of a run: :func:`load_rows` (``data.on_bad_row``,
    ``data.prompt_key``, ``reward.sources``), a scorer check of every data_source (unknown: an error
    naming it), :class:`PromptTemplates` from ``data.prompt_templates``, and :func:`filter_by_length`
    at ``data.max_prompt_length`` with the agent's tool block (``tools`` default: the code
    interpreter). ``stats`` gains ``too_long`` (rows dropped by length) and ``by_source`` (rows kept per
    data_source)."""

    sources = getattr(reward_cfg, "sources", None) if reward_cfg is not None else None
    rows, stats = load_rows(files, kind, getattr(data_cfg, "on_bad_row", "error"),
                            prompt_key=getattr(data_cfg, "prompt_key", "prompt"), sources=sources)
    check_sources({r["data_source"] for r in rows}, reward_cfg)
    rows = PromptTemplates.from_config(data_cfg).apply_rows(rows)
    rows, too_long = filter_by_length(rows, tokenizer, data_cfg.max_prompt_length,
                                      [CODE_INTERPRETER_TOOL] if tools is None else tools, enable_thinking)
    stats["too_long"] = too_long
    stats["rows"] = len(rows)
    stats["by_source"] = dict(Counter(r["data_source"] for r in rows))
    return rows, stats


# ---------------------------------------------------------------------------------------------
# The prompt loader (grain)
# ---------------------------------------------------------------------------------------------


class _ShardedEpochs(grain.MapDataset):
    """Element k of this process's stream: epoch ``e = k // per`` and, with ``b`` = rows per process
    per step, step ``s = (k % per) // b`` of it; the element is position ``s * b * P + p * b + k % b``
    of the epoch's order. A step's global batch is therefore the next ``b * P`` positions of the order
    and process p takes the p-th block of it: the global batch, its row order and each prompt's global
    position do not depend on the number of processes. ``per`` = rows per process per epoch (the
    epoch's ragged tail dropped so every process yields the same number of rows)."""

    def __init__(self, parent: grain.MapDataset, num_rows: int, per: int, batch: int, process_index: int,
                 process_count: int, num_epochs: Optional[int]):
        super().__init__(parent)
        self._n, self._per, self._b = num_rows, per, batch
        self._p, self._pc, self._epochs = process_index, process_count, num_epochs

    def __len__(self) -> int:
        return sys.maxsize if self._epochs is None else self._epochs * self._per

    def __getitem__(self, index):
        if isinstance(index, slice):
            return self.slice(index)
        e, k = divmod(index, self._per)
        step, j = divmod(k, self._b)
        return self._parent[e * self._n + step * self._b * self._pc + self._p * self._b + j]


class PromptLoader:
    """Batches of rows for the RL loop: grain shuffle by ``seed`` (a new order each epoch), sharded by
    process, checkpointable.

    ``batch_size`` is the number of rows THIS process gets per step. Each epoch's order is the same on
    every process; a step's global batch is the next ``batch_size * P`` positions of it and process p
    takes the p-th contiguous block, so within an epoch the shards are disjoint and together cover the
    first ``steps_per_epoch * batch_size * P`` rows of the order (the ragged tail is dropped that epoch
    so every process runs the same number of steps), and the global batches are the same for any
    process count. :meth:`global_index` gives a row's position in the global batch (prompt seeds
    use it). ``num_epochs=None`` repeats forever. Iterating yields lists of rows.

    ``get_state()`` is a JSON-able dict, the same on every process (the number of steps taken and the
    global batch size); ``set_state()`` on a loader over the same rows with the same seed and global
    batch size continues with exactly the batches that would have followed, whatever the process
    count of the run that saved it.
    """

    def __init__(self, rows: Sequence[dict], batch_size: int, *, seed: int, shuffle: bool = True,
                 num_epochs: Optional[int] = None, process_index: Optional[int] = None,
                 process_count: Optional[int] = None):
        if process_index is None or process_count is None:
            import jax

            process_index = jax.process_index() if process_index is None else process_index
            process_count = jax.process_count() if process_count is None else process_count
        if not 0 <= process_index < process_count:
            raise ValueError(f"process_index {process_index} must be in [0, {process_count})")
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        if num_epochs is not None and num_epochs < 1:
            raise ValueError(f"num_epochs must be >= 1 or None, got {num_epochs}")
        self.rows = list(rows)
        n = len(self.rows)
        self.steps_per_epoch = n // (batch_size * process_count)
        if self.steps_per_epoch == 0:
            raise DataError(f"{n} rows are fewer than one step needs: batch_size {batch_size} x "
                            f"{process_count} processes")
        self.batch_size, self.seed, self.shuffle, self.num_epochs = batch_size, seed, shuffle, num_epochs
        self.process_index, self.process_count = process_index, process_count
        ds = grain.MapDataset.range(n)
        if shuffle:
            ds = ds.shuffle(seed=seed)
        ds = ds.repeat(num_epochs, reseed_each_epoch=True)
        ds = _ShardedEpochs(ds, n, self.steps_per_epoch * batch_size, batch_size, process_index, process_count,
                            num_epochs)
        self._dataset = ds.batch(batch_size, drop_remainder=True, batch_fn=list)
        # rows are in memory: no reader threads needed
        self._iter = iter(self._dataset.to_iter_dataset(grain.ReadOptions(num_threads=0, prefetch_buffer_size=0)))

    def __len__(self) -> int:
        """Steps in total (``steps_per_epoch * num_epochs``); raises for endless loaders."""
        if self.num_epochs is None:
            raise TypeError("an endless PromptLoader (num_epochs=None) has no length")
        return self.steps_per_epoch * self.num_epochs

    def __iter__(self) -> Iterator[list[dict]]:
        return self

    def __next__(self) -> list[dict]:
        idx = next(self._iter)
        return [self.rows[int(i)] for i in idx]

    def global_index(self, i: int) -> int:
        """Position in the step's global batch of this process's row ``i``."""
        return self.process_index * self.batch_size + i

    def _fingerprint(self) -> dict:
        return {"num_rows": len(self.rows), "global_batch_size": self.batch_size * self.process_count,
                "seed": self.seed, "shuffle": self.shuffle, "num_epochs": self.num_epochs}

    def get_state(self) -> dict:
        """JSON-able position of this loader: steps taken and how the loader was built (the same on
        every process)."""
        steps = int(self._iter.get_state().get("next_index", 0))
        return {"steps": steps, **self._fingerprint()}

    def set_state(self, state: Mapping[str, Any]) -> None:
        """Continue from ``state`` (from :meth:`get_state` of a loader over the same rows, seed and
        global batch size, with any process count)."""
        state = dict(state)
        if "steps" not in state:  # a state written before the layout-independent order
            state["steps"] = int(state["iterator"]["next_index"])
            state["global_batch_size"] = state["batch_size"] * state["process_count"]
        mine = self._fingerprint()
        diff = {k: (state.get(k), v) for k, v in mine.items() if state.get(k) != v}
        if diff:
            what = ", ".join(f"{k}: saved {a!r}, now {b!r}" for k, (a, b) in diff.items())
            raise DataError(f"data-loader state does not match this loader ({what}); resume with the same data, "
                            "seed and global batch size (train.prompts_per_step)")
        self._iter.set_state({"next_index": int(state["steps"])})

    @property
    def epoch(self) -> int:
        """Epoch of the next batch."""
        return int(self._iter.get_state().get("next_index", 0)) // self.steps_per_epoch
