"""Rows from real parquet/jsonl files in the Open-AgentRL column layouts, malformed-row errors,
prompt templates, the length filter and the grain prompt loader."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from sod_jax.chat import CODE_INTERPRETER_TOOL, ChatTokenizer
from sod_jax.data import DataError, PromptLoader, PromptTemplates, filter_by_length, load_rows

REPO = Path(__file__).resolve().parents[2]


def rl_records(n=6):
    return [{"data_source": "math_dapo" if i % 2 else "mega-science",
             "prompt": [{"role": "user", "content": f"What is {i} + {i}?"}],
             "ability": "MATH",
             "reward_model": {"ground_truth": str(2 * i), "style": "rule"},
             "extra_info": {"index": i, "split": "train"}} for i in range(n)]


def lcb_gt(fn_name=None):
    gt = {"inputs": ["1 2\n", "3 4\n"], "outputs": ["3\n", "7\n"]}
    if fn_name:
        gt["fn_name"] = fn_name
    return gt


def write_parquet(path: Path, records: list[dict]) -> Path:
    pq.write_table(pa.Table.from_pylist(records), path)
    return path


@pytest.fixture
def eval_files(tmp_path):
    aime = write_parquet(tmp_path / "aime.parquet", [
        {"data_source": "AIME2024", "prompt": [{"role": "user", "content": "Find x."}],
         "reward_model": {"ground_truth": "204", "style": "rule"}, "extra_info": {"index": 0}},
        {"data_source": "gpqa_diamond", "prompt": [{"role": "user", "content": "Which? A) 1 B) 2"}],
         "reward_model": {"ground_truth": "B", "style": "rule"}, "extra_info": {"index": 1}}])
    # LiveCodeBench rows: reward_model and extra_info are JSON strings; ground_truth is itself a JSON string
    lcb = write_parquet(tmp_path / "lcb.parquet", [
        {"data_source": "LiveCodeBench_v6", "prompt": [{"role": "user", "content": "Add two numbers."}],
         "reward_model": json.dumps({"ground_truth": json.dumps(lcb_gt()), "style": "rule"}),
         "extra_info": json.dumps({"index": 0, "difficulty": "easy"})},
        {"data_source": "LiveCodeBench_v6", "prompt": [{"role": "user", "content": "Add, as a function."}],
         "reward_model": json.dumps({"ground_truth": lcb_gt("add"), "style": "rule"}),
         "extra_info": json.dumps({"index": 1})}])
    return aime, lcb


def test_rl_parquet_and_jsonl(tmp_path):
    recs = rl_records()
    a = write_parquet(tmp_path / "a.parquet", recs[:4])
    b = tmp_path / "b.jsonl"
    b.write_text("".join(json.dumps(r) + "\n" for r in recs[4:]))
    c = tmp_path / "c.json"
    c.write_text(json.dumps(recs[:2]))
    assert [r["index"] for r in load_rows(c, "rl")[0]] == [0, 1]  # a JSON array file
    rows, stats = load_rows([a, b], "rl")
    assert stats["rows_read"] == 6 and stats["rows"] == 6 and stats["bad_rows"] == 0
    assert [r["index"] for r in rows] == list(range(6))
    for r, rec in zip(rows, recs):
        assert r["data_source"] == rec["data_source"]
        assert r["prompt"] == rec["prompt"]
        assert r["ground_truth"] == rec["reward_model"]["ground_truth"]
        assert r["extra_info"] == rec["extra_info"]


def test_eval_rows_with_json_string_columns(eval_files):
    rows, stats = load_rows(list(eval_files), "eval")
    assert stats["rows"] == 4
    assert rows[0]["ground_truth"] == "204" and rows[1]["ground_truth"] == "B"
    assert rows[2]["ground_truth"] == lcb_gt() and rows[2]["extra_info"] == {"index": 0, "difficulty": "easy"}
    assert rows[3]["ground_truth"] == lcb_gt("add")


def test_sft_rows(tmp_path):
    tools = [CODE_INTERPRETER_TOOL]
    recs = [{"messages": [
        {"role": "system", "content": "You are helpful.", "tool_calls": None},
        {"role": "user", "content": "2+2?", "tool_calls": None},
        {"role": "assistant", "content": "", "tool_calls": [
            {"type": "function", "function": {"name": "code_interpreter", "arguments": json.dumps({"code": "2+2"})}}]},
        {"role": "tool", "content": "4", "tool_calls": None},
        {"role": "assistant", "content": "\\boxed{4}", "tool_calls": None}],
        "tools": json.dumps(tools)}]
    f = write_parquet(tmp_path / "sft.parquet", recs)
    rows, stats = load_rows(f, "sft")
    assert stats["rows"] == 1
    msgs = rows[0]["messages"]
    assert [m["role"] for m in msgs] == ["system", "user", "assistant", "tool", "assistant"]
    assert "tool_calls" not in msgs[0] and "tool_calls" not in msgs[4]
    assert msgs[2]["tool_calls"][0]["function"] == {"name": "code_interpreter", "arguments": {"code": "2+2"}}
    assert rows[0]["tools"] == tools
    # tools as a parquet struct column: schemas of different shapes get None-filled fields, dropped again
    other = {"type": "function", "function": {"name": "search", "description": "web",
                                              "parameters": {"type": "object", "properties": {
                                                  "query": {"type": "string"}}, "required": ["query"]}}}
    recs[0]["tools"] = [CODE_INTERPRETER_TOOL, other]
    g = write_parquet(tmp_path / "sft_struct.parquet", recs)
    assert pq.read_table(g).to_pylist()[0]["tools"][1]["function"]["parameters"]["properties"]["code"] is None
    assert load_rows(g, "sft")[0][0]["tools"] == [CODE_INTERPRETER_TOOL, other]


@pytest.mark.parametrize("mutate, column, what", [
    (lambda r: r.pop("data_source"), "data_source", "is missing"),
    (lambda r: r.pop("reward_model"), "reward_model", "is missing"),
    (lambda r: r.__setitem__("prompt", "not json ["), "prompt", "not valid JSON"),
    (lambda r: r.__setitem__("prompt", json.dumps({"role": "user"})), "prompt", "must be a list"),
    (lambda r: r.__setitem__("prompt", "[]"), "prompt", "is empty"),
    (lambda r: r.__setitem__("prompt", json.dumps([{"role": "user", "content": "  "}])), "prompt",
     "no non-empty"),
    (lambda r: r.__setitem__("prompt", json.dumps([{"role": "robot", "content": "x"}])), "prompt[0].role",
     "must be one of"),
    (lambda r: r.__setitem__("prompt", json.dumps([{"role": "user", "content": 3}])), "prompt[0].content",
     "must be a string"),
    (lambda r: r.__setitem__("reward_model", json.dumps({"style": "rule"})), "reward_model.ground_truth",
     "is missing"),
    (lambda r: r.__setitem__("extra_info", json.dumps([1, 2])), "extra_info", "must be a mapping"),
])
def test_malformed_rl_rows(tmp_path, mutate, column, what):
    recs = rl_records(3)
    for r in recs:  # jsonl rows of one layout; the bad one is row 1
        r["prompt"] = json.dumps(r["prompt"])
        r["reward_model"] = json.dumps(r["reward_model"])
        r["extra_info"] = json.dumps(r["extra_info"])
    mutate(recs[1])
    f = tmp_path / "bad.jsonl"
    f.write_text("".join(json.dumps(r) + "\n" for r in recs))
    with pytest.raises(DataError) as e:
        load_rows(f, "rl")
    msg = str(e.value)
    assert str(f) in msg and "row 1," in msg and f"column '{column}'" in msg and what in msg
    assert "data.on_bad_row" in msg
    rows, stats = load_rows(f, "rl", on_bad_row="skip")
    assert [r["extra_info"]["index"] for r in rows] == [0, 2]
    assert stats["bad_rows"] == 1 and stats["bad_by_column"] == {column: 1}


def test_code_ground_truth_that_does_not_parse(tmp_path):
    recs = [{"data_source": "LiveCodeBench_v6", "prompt": [{"role": "user", "content": "p"}],
             "reward_model": json.dumps({"ground_truth": gt}), "extra_info": "{}"}
            for gt in (json.dumps(lcb_gt()), "{not json", json.dumps({"inputs": ["1"], "outputs": []}))]
    f = write_parquet(tmp_path / "lcb.parquet", recs)
    with pytest.raises(DataError, match=r"row 1, column 'reward_model.ground_truth': is a string that is not valid JSON"):
        load_rows(f, "eval")
    rows, stats = load_rows(f, "eval", on_bad_row="skip")
    assert len(rows) == 1 and stats["bad_rows"] == 2
    # a source mapped onto the code scorer by reward.sources is checked the same way
    recs[0]["data_source"] = "my_code"
    g = write_parquet(tmp_path / "mine.parquet", recs[:2])
    with pytest.raises(DataError, match="row 1"):
        load_rows(g, "eval", sources={"my_code": "code"})


def test_malformed_sft_rows(tmp_path):
    recs = [{"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"}]},
            {"messages": [{"role": "user", "content": "hi"}]},
            {"msgs": []},
            {"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "x"}], "tools": "{"}]
    f = tmp_path / "sft.jsonl"
    f.write_text("".join(json.dumps(r) + "\n" for r in recs))
    with pytest.raises(DataError, match=r"row 1, column 'messages': has no assistant message"):
        load_rows(f, "sft")
    rows, stats = load_rows(f, "sft", on_bad_row="skip")
    assert len(rows) == 1 and stats["bad_by_column"] == {"messages": 2, "tools": 1}


def test_missing_file_and_format(tmp_path):
    with pytest.raises(DataError, match="does not exist"):
        load_rows(tmp_path / "nope.parquet", "rl")
    (tmp_path / "x.csv").write_text("a,b\n")
    with pytest.raises(DataError, match="unsupported format"):
        load_rows(tmp_path / "x.csv", "rl")
    (tmp_path / "x.jsonl").write_text('{"a": 1}\n[1]\n')
    with pytest.raises(DataError, match="line 2 must be a JSON object"):
        load_rows(tmp_path / "x.jsonl", "rl")


# -- templates ------------------------------------------------------------------------------------


def test_templates_per_source_and_pass_through(eval_files, tmp_path):
    rows, _ = load_rows(list(eval_files), "eval")
    own = tmp_path / "mine.jinja"
    own.write_text("[{{ data_source }}] {{ problem }} (difficulty {{ extra_info.difficulty }})\n")
    t = PromptTemplates({"AIME2024": "math", "gpqa_diamond": "gpqa", "LiveCodeBench_v6": str(own)})
    math_msg = t.apply(rows[0])[-1]["content"]
    assert math_msg.startswith("Solve the following problem") and "\nFind x.\n" in math_msg
    assert "Python" in math_msg and "plan" in math_msg and math_msg.endswith("\\boxed{42}.")
    gpqa_msg = t.apply(rows[1])[-1]["content"]
    assert "Which? A) 1 B) 2" in gpqa_msg and "uppercase" in gpqa_msg and "\\boxed{B}" in gpqa_msg
    assert t.apply(rows[2])[-1]["content"] == "[LiveCodeBench_v6] Add two numbers. (difficulty easy)"
    with pytest.raises(DataError, match="on row 3: 'dict object' has no attribute 'difficulty'"):  # row 3's extra_info lacks it
        t.apply(rows[3])
    assert rows[0]["prompt"][0]["content"] == "Find x."  # the row itself is untouched
    assert PromptTemplates({}).apply(rows[0]) == rows[0]["prompt"]  # untemplated sources pass through
    lcb = PromptTemplates({"LiveCodeBench_v6": "livecodebench"}).apply(rows[2])[-1]["content"]
    assert "standard input" in lcb and "```python" in lcb


def test_template_errors(tmp_path):
    with pytest.raises(DataError, match=r"no prompt template named 'nosuch' \(known: gpqa, livecodebench, math"):
        PromptTemplates({"AIME2024": "nosuch"})
    with pytest.raises(DataError, match="does not exist"):
        PromptTemplates({"AIME2024": str(tmp_path / "gone.jinja")})
    bad = tmp_path / "bad.jinja"
    bad.write_text("{{ problem ")
    with pytest.raises(DataError, match="bad.jinja"):
        PromptTemplates({"AIME2024": str(bad)})


def test_templates_from_config():
    from sod_jax.config import load_config

    cfg = load_config(None, ["algo.name=grpo", "data.prompt_templates={AIME2024: math}"])
    t = PromptTemplates.from_config(cfg.data)
    assert set(t.templates) == {"AIME2024"}


# -- length filter --------------------------------------------------------------------------------


def test_filter_counts_the_tool_system_block(tokenizer_dir):
    tok = ChatTokenizer.from_dir(tokenizer_dir)
    rows = [{"data_source": "math", "prompt": [{"role": "user", "content": "x " * n}], "index": i}
            for i, n in enumerate((1, 20, 40, 80))]
    tools = [CODE_INTERPRETER_TOOL]
    with_tools = [len(tok.encode_chat(r["prompt"], tools)) for r in rows]  # what the agent feeds the model
    without = [len(tok.encode_chat(r["prompt"])) for r in rows]
    limit = with_tools[1]
    assert without[2] <= limit < with_tools[2]  # fits without the tool block, overflows with it
    kept, dropped = filter_by_length(rows, tok, limit, tools)
    assert [r["index"] for r in kept] == [0, 1] and dropped == 2
    kept, dropped = filter_by_length(rows, tok, limit, None)  # the reference's measure keeps row 2
    assert 2 in [r["index"] for r in kept]


# -- loader ---------------------------------------------------------------------------------------


def ids(batch):
    return [r["i"] for r in batch]


@pytest.mark.parametrize("procs", [2, 3])
def test_shards_disjoint_and_covering(procs):
    rows = [{"i": i} for i in range(24)]
    per_epoch = {0: [], 1: []}
    for p in range(procs):
        loader = PromptLoader(rows, 2, seed=5, num_epochs=2, process_index=p, process_count=procs)
        assert loader.steps_per_epoch == 24 // (2 * procs) and len(loader) == 2 * loader.steps_per_epoch
        batches = [ids(b) for b in loader]
        assert len(batches) == len(loader) and all(len(b) == 2 for b in batches)
        for e in (0, 1):
            per_epoch[e] += [i for b in batches[e * loader.steps_per_epoch:(e + 1) * loader.steps_per_epoch]
                             for i in b]
    for e in (0, 1):
        assert sorted(per_epoch[e]) == list(range(24))  # disjoint (no repeats) and covering
    assert per_epoch[0] != per_epoch[1]  # each epoch has its own order


def test_order_is_seeded_and_unshuffled_is_in_order():
    rows = [{"i": i} for i in range(10)]
    a = [ids(b) for b in PromptLoader(rows, 3, seed=1, num_epochs=1, process_index=0, process_count=1)]
    b = [ids(b) for b in PromptLoader(rows, 3, seed=1, num_epochs=1, process_index=0, process_count=1)]
    c = [ids(b) for b in PromptLoader(rows, 3, seed=2, num_epochs=1, process_index=0, process_count=1)]
    assert a == b and a != c and len(a) == 3  # ragged tail (1 row) dropped
    d = [ids(b) for b in PromptLoader(rows, 3, seed=1, shuffle=False, num_epochs=2, process_index=0,
                                      process_count=1)]
    assert d == [[0, 1, 2], [3, 4, 5], [6, 7, 8]] * 2


def test_loader_errors():
    with pytest.raises(DataError, match="fewer than one step"):
        PromptLoader([{"i": 0}] * 3, 2, seed=0, process_index=0, process_count=2)
    loader = PromptLoader([{"i": i} for i in range(8)], 2, seed=0, process_index=0, process_count=1)
    state = loader.get_state()
    other = PromptLoader([{"i": i} for i in range(8)], 2, seed=1, process_index=0, process_count=1)
    with pytest.raises(DataError, match="seed: saved 0, now 1"):
        other.set_state(state)


RESUME = textwrap.dedent("""
    import json, sys
    from sod_jax.data import PromptLoader
    rows = [{"i": i} for i in range(30)]
    loader = PromptLoader(rows, 4, seed=7, process_index=1, process_count=2)
    loader.set_state(json.loads(sys.argv[1]))
    print(json.dumps([[r["i"] for r in next(loader)] for _ in range(6)]))
""")


@pytest.mark.slow
def test_state_restores_exactly_in_a_fresh_process():
    rows = [{"i": i} for i in range(30)]
    loader = PromptLoader(rows, 4, seed=7, process_index=1, process_count=2)  # 3 steps per epoch, endless
    for _ in range(5):  # into the second epoch
        next(loader)
    state = json.loads(json.dumps(loader.get_state()))
    expected = [ids(next(loader)) for _ in range(6)]  # crosses into the third epoch
    out = subprocess.run([sys.executable, "-c", RESUME, json.dumps(state)], capture_output=True, text=True,
                         cwd=REPO, timeout=120)
    assert out.returncode == 0, out.stderr
    assert json.loads(out.stdout) == expected


def test_prompt_pipeline_from_config_and_parquet_through_the_loader(tmp_path, tokenizer_dir):
    from sod_jax.config import load_config

    recs = rl_records(8)
    recs[3]["prompt"] = [{"role": "user", "content": "long " * 400}]
    recs[5]["reward_model"] = {"style": "rule"}  # no ground truth: skipped and counted
    f = write_parquet(tmp_path / "train.parquet", recs)
    cfg = load_config(None, ["algo.name=grpo", "data.on_bad_row=skip", "data.max_prompt_length=1000",
                             "data.prompt_templates={math_dapo: math}"])
    from sod_jax.data import load_prompt_rows

    tok = ChatTokenizer.from_dir(tokenizer_dir)
    rows, stats = load_prompt_rows(f, cfg.data, tok, reward_cfg=cfg.reward)
    assert stats["bad_rows"] == 1 and stats["too_long"] == 1 and stats["rows"] == 6
    assert stats["by_source"] == {"mega-science": 4, "math_dapo": 2}
    assert rows[1]["prompt"][-1]["content"].startswith("Solve the following problem")  # math_dapo templated
    assert rows[0]["prompt"] == recs[0]["prompt"]  # mega-science passes through
    batches = list(PromptLoader(rows, 3, seed=0, num_epochs=1, process_index=0, process_count=1))
    assert sorted(r["index"] for b in batches for r in b) == [0, 1, 2, 4, 6, 7]
    recs[0]["data_source"] = "unknown_set"
    g = write_parquet(tmp_path / "unknown.parquet", recs[:1])
    with pytest.raises(ValueError, match="'unknown_set'"):
        load_prompt_rows(g, cfg.data, tok, reward_cfg=cfg.reward)


def test_global_batches_do_not_depend_on_the_process_count():
    """1 process x 4 rows, 2 x 2 and 4 x 1 see the same global batches in the same row order, and a
    state saved by a 2-process run continues in a 1-process run with the batches that would follow."""
    rows = [{"i": i} for i in range(40)]

    def global_batches(procs, steps=12, state=None):
        loaders = [PromptLoader(rows, 4 // procs, seed=9, process_index=p, process_count=procs) for p in range(procs)]
        if state is not None:
            for lo in loaders:
                lo.set_state(state)
        out = []
        for _ in range(steps):  # crosses into the second epoch (10 steps per epoch)
            batch = []
            for lo in loaders:
                batch += ids(next(lo))
            out.append(batch)
        return out, loaders

    one, _ = global_batches(1)
    assert global_batches(2)[0] == one and global_batches(4)[0] == one
    assert PromptLoader(rows, 2, seed=9, process_index=1, process_count=2).global_index(1) == 3
    _, two = global_batches(2, steps=5)
    states = [lo.get_state() for lo in two]
    assert states[0] == states[1] and states[0]["steps"] == 5 and states[0]["global_batch_size"] == 4
    rest, _ = global_batches(1, steps=7, state=json.loads(json.dumps(states[0])))
    assert rest == one[5:]
    with pytest.raises(DataError, match="global_batch_size: saved 4, now 6"):
        PromptLoader(rows, 6, seed=9, process_index=0, process_count=1).set_state(states[0])
