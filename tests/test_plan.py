"""``python -m sod_jax.plan``: target names, the search and the arithmetic, the TPU plan of tiny configs
(one that fits, one whose update does not fit and the micro-batch that does, an SFT config) with the
compile-only TPU client, the GPU estimate against a hand computation, and the planner's programs
against the ones the trainer builds from real weights (the same memory analysis on CPU devices)."""

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import jax
import pytest
import yaml
from conftest import REPO

from sod_jax.config import load_config
from sod_jax.models.hf import config_to_hf
from sod_jax.models.presets import preset
from sod_jax.models.qwen3 import Qwen3Config
from sod_jax.plan import arith
from sod_jax.plan.hardware import TargetError, parse_target, tpu_available

NO_TPU = tpu_available()
needs_tpu = pytest.mark.skipif(NO_TPU is not None, reason=f"compile-only TPU planning: {NO_TPU}")

TINY = dict(vocab_size=256, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2, head_dim=16, eos_token_id=2, bos_token_id=1)


def _arch(root: Path, name: str, **kw) -> str:
    d = root / name
    d.mkdir(parents=True, exist_ok=True)
    (d / "config.json").write_text(json.dumps(config_to_hf(Qwen3Config(**{**TINY, **kw}), "float32")))
    return str(d)


def _config_file(root: Path, name: str, sections: dict) -> Path:
    path = root / f"{name}.yaml"
    path.write_text(yaml.safe_dump(sections))
    return path


def _tiny_rl(root: Path, **over) -> dict:
    """A tiny SOD config: 4 prompts x 4 rollouts, 2 mini-batches, 16 slots of 512 tokens."""
    cfg = {
        "model": {"path": _arch(root, "student"), "dtype": "bfloat16", "param_dtype": "float32", "remat": "full",
                  "attention_block": 128, "logprob_chunk": 128},
        "teacher": {"path": _arch(root, "teacher", hidden_size=96, num_hidden_layers=3), "param_dtype": "bfloat16",
                    "attention_block": 128},
        "data": {"max_prompt_length": 128, "train_files": ["unused.parquet"]},
        "rollout": {"n": 4, "max_response_length": 384, "max_assistant_turns": 3, "num_slots": 16, "decode_steps": 8,
                    "prefill_buckets": [64, 128], "extend_buckets": [32, 128]},
        "tool": {"max_output_chars": 64},
        "reward": {"overlong_buffer_len": 64},
        "train": {"prompts_per_step": 4, "mini_batches": 2},
        "mesh": {"data": 1, "fsdp": -1, "tensor": 1},
    }
    for key, value in over.items():
        sec, k = key.split(".")
        cfg[sec][k] = value
    return cfg


def _plan_cli(*args, timeout=600):
    env = dict(os.environ, JAX_PLATFORMS="cpu")
    return subprocess.run([sys.executable, "-m", "sod_jax.plan", *args], capture_output=True, text=True, cwd=REPO,
                          env=env, timeout=timeout)


# ---------------------------------------------------------------------------------------------
# Names, search, arithmetic
# ---------------------------------------------------------------------------------------------


def test_target_names():
    assert (parse_target("v5e-8").chips, parse_target("v5e-8").topology) == (8, "v5e:2x4")
    assert (parse_target("v6e-8").chips, parse_target("v6e-8").topology) == (8, "v6e:2x4")
    # v4 and v5p accelerator types count TensorCores, two per chip
    assert (parse_target("v4-32").chips, parse_target("v4-32").topology) == (16, "v4:2x2x4")
    assert (parse_target("v5p-8").chips, parse_target("v5p-8").topology) == (4, "v5p:2x2x1")
    assert (parse_target("v5p-16").chips, parse_target("v5p-16").topology) == (8, "v5p:2x2x2")
    assert parse_target("v5p-128").topology == "v5p:4x4x4"
    assert (parse_target("v5e:2x4").chips, parse_target("v4:2x2x4").chips) == (8, 16)
    gpu = parse_target("8xH100")
    assert (gpu.kind, gpu.chips, gpu.chip.hbm_bytes) == ("gpu", 8, 80 * 10**9)
    assert parse_target("cpu:4").chips == 4
    for bad in ("v5e-6", "v9-8", "8xT4", "tpu"):
        with pytest.raises(TargetError):
            parse_target(bad)


def test_largest_fitting_probes_few_and_respects_its_time_bound():
    cands = list(range(4, 257, 4))
    for limit in (3, 4, 100, 256, 300):
        probes = []
        best, tried, done = arith.largest_fitting(cands, lambda c: probes.append(c) or c <= limit, 60)
        assert best == (max(c for c in cands if c <= limit) if limit >= 4 else None) and done
        assert len(probes) <= math.ceil(math.log2(len(cands))) + 1
        assert all(tried[c] == (c <= limit) for c in tried)
    # A right prediction settles it in two probes: the predicted value and its neighbour.
    probes = []
    best, _, _ = arith.largest_fitting(cands, lambda c: probes.append(c) or c <= 100, 60, predict=lambda: 101.0)
    assert best == 100 and sorted(probes) == [100, 104]
    ticks = iter(range(100))
    best, tried, done = arith.largest_fitting(cands, lambda c: c <= 100, 2.5, clock=lambda: next(ticks))
    assert not done and len(tried) == 2
    assert arith.micro_batch_candidates(256, 8) == [8, 16, 32, 64, 128, 256]
    assert arith.micro_batch_candidates(6, 4) == [1, 2, 3, 6]
    assert arith.slot_candidates(16, 40, 8) == [16, 24, 32, 40]


def test_gpu_count_is_an_arithmetic_estimate_matching_a_hand_computation(tmp_path):
    """8xH100 without H100s here: the paper's SOD settings sized by the sharding rules and formulas,
    checked against the same quantities computed directly."""
    from sod_jax.plan import plan_config

    cfg = load_config(REPO / "configs" / "sod_qwen3_0.6b.yaml", ["train.micro_batch_size=8", "rollout.num_slots=64"])
    r = plan_config(cfg, "8xH100")
    assert r.method == "estimate" and r.programs == [] and "ARITHMETIC ESTIMATE" in r.notes[0]
    s, t = preset("qwen3-0.6b"), preset("qwen3-4b")
    D, L, H = s.hidden_size, s.num_hidden_layers, s.head_dim
    replicated = L * (2 * D + 2 * H) + D  # norm weights: no embed axis to shard over fsdp=8
    m = r.memory
    assert m["params"] == (s.num_params() - replicated) * 4 // 8 + replicated * 4
    assert m["optimizer"] >= 2 * m["params"]  # Adam moments like the params (plus a step count)
    t_rep = t.num_hidden_layers * (2 * t.hidden_size + 2 * t.head_dim) + t.hidden_size
    assert m["teacher"] == (t.num_params() - t_rep) * 2 // 8 + t_rep * 2
    assert m["sampling_copy"] == s.num_params() * 2  # bf16, replicated (tensor=1)
    # positions x layers x kv heads x head dim x (k, v) x bf16
    per_slot = (2560 + 20480) * L * s.num_key_value_heads * H * 2 * 2
    slots_per_chip = r.settings["slots_per_device"]
    assert slots_per_chip == math.ceil(64 / r.settings["slot_devices"]) and r.settings["slot_devices"] in (1, 8)
    assert slots_per_chip * per_slot <= m["kv_cache"] <= slots_per_chip * (per_slot + 64)  # + per-slot scalars
    assert m["peak"] == max(m["resident_update"], m["resident_rollout"])
    assert r.target["usable_bytes"] == int(80e9 * 0.75)
    # Update time: rows x T x per-token FLOPs x passes / 8 GPUs / peak.
    T, rows = 2560 + 20480, 64 * 16

    def fwd(c):
        ctx = (T + c.attention_block) / 2
        dense = 2 * (c.hidden_size * c.head_dim * (c.num_attention_heads + 2 * c.num_key_value_heads)
                     + c.num_attention_heads * c.head_dim * c.hidden_size + 3 * c.hidden_size * c.intermediate_size)
        return rows * T * (c.num_hidden_layers * (dense + 4 * c.num_attention_heads * c.head_dim * ctx)
                           + 2 * c.hidden_size * c.vocab_size)

    update = next(p for p in r.step_time["parts"] if p["name"] == "update")
    assert update["seconds"] == pytest.approx((5 * fwd(s) + fwd(t)) / 8 / 989e12, rel=1e-9)
    assert r.step_time["estimate"] is True and r.step_time["formula"]
    knobs = {k["key"]: k for k in r.knobs}
    assert knobs["train.micro_batch_size"]["method"] == "formula"


def test_cli_json_for_a_gpu_estimate_and_errors(tmp_path):
    cfg = _config_file(tmp_path, "rl", _tiny_rl(tmp_path))
    p = _plan_cli("--config", str(cfg), "--topology", "2xH100", "--json")
    assert p.returncode in (0, 3), p.stderr
    r = json.loads(p.stdout)
    assert r["method"] == "estimate" and r["target"]["chips"] == 2 and "estimate" in r["verdict"]
    p = _plan_cli("--config", str(cfg), "--topology", "v7x-9")
    assert p.returncode == 2 and "unknown TPU generation 'v7x'" in p.stderr
    p = _plan_cli("--config", str(cfg), "--topology", "8 chips")
    assert p.returncode == 2 and "cannot read target" in p.stderr
    p = _plan_cli("--config", str(cfg), "--topology", "cpu:2", "model.path=/nowhere/at/all")
    assert p.returncode == 2 and "--student-preset" in p.stderr


# ---------------------------------------------------------------------------------------------
# TPU slices, compile-only
# ---------------------------------------------------------------------------------------------


@needs_tpu
def test_tpu_plan_of_a_tiny_config_fits(tmp_path):
    cfg = _config_file(tmp_path, "rl", _tiny_rl(tmp_path))
    p = _plan_cli("--config", str(cfg), "--topology", "v5e:2x2", "--json")
    assert p.returncode == 0, p.stderr[-3000:]
    assert "libtpu" not in p.stderr.lower() and "E0000" not in p.stderr  # the TPU client's start-up noise is kept off
    r = json.loads(p.stdout)
    assert r["method"] == "compiled" and r["fits"] is True and r["verdict"].startswith("fits")
    assert r["target"]["chips"] == 4 and r["target"]["usable_bytes"] == int(15.75 * 2**30)
    assert r["mesh"] == {"data": 1, "fsdp": 4, "tensor": 1}
    names = {pr["program"] for pr in r["programs"]}
    assert {"update", "sampling_copy", "prefill", "insert", "decode", "extend"} <= names
    assert all(pr["compiled"] and pr["temp"] >= 0 and pr["argument"] > 0 for pr in r["programs"])
    m = r["memory"]
    for key in ("params", "optimizer", "teacher", "update_extra", "sampling_copy", "kv_cache", "rollout_extra",
                "resident_update", "resident_rollout", "peak", "chip"):
        assert m[key] is not None and m[key] >= 0, key
    tiny = Qwen3Config(**TINY)
    replicated = tiny.num_hidden_layers * (2 * tiny.hidden_size + 2 * tiny.head_dim) + tiny.hidden_size
    assert m["params"] == (tiny.num_params() - replicated) * 4 // 4 + replicated * 4  # fp32, fsdp=4
    assert m["resident_rollout"] == m["params"] + m["optimizer"] + m["teacher"] + m["sampling_copy"] + \
        m["kv_cache"] + m["rollout_extra"]
    assert m["peak"] == max(m["resident_update"], m["resident_rollout"], m.get("resident_refresh") or 0)
    st = r["step_time"]
    assert st["estimate"] is True and st["total"] > 0 and any("cost_analysis" in f for f in st["formula"])
    assert {p["name"] for p in st["parts"]} >= {"rollouts: decode", "update"}
    assert r["knobs"] == []


@pytest.mark.slow
@needs_tpu
def test_a_config_that_does_not_fit_is_refused_by_the_train_preflight_with_the_micro_batch_that_does(tmp_path):
    """`python -m sod_jax.train --plan v5e:2x2`: dense attention over 4,096 tokens with 16 heads and
    nothing rematerialised, so two rows per chip per micro-batch exceed a v5e chip and one fits. The
    run stops at its pre-flight (exit 2, one line naming the knob) with no weights anywhere (the
    checkpoints are config.json files only), and plan.json holds the planner's report."""
    from conftest import build_tokenizer

    from sod_jax import train as train_cli

    vocab = dict(vocab_size=1024)
    big = _arch(tmp_path, "big", num_attention_heads=16, num_key_value_heads=16, head_dim=64, num_hidden_layers=4,
                **vocab)
    teacher = _arch(tmp_path, "teacher_1k", hidden_size=96, num_hidden_layers=3, **vocab)
    for d in (big, teacher):
        build_tokenizer(Path(d))
    data = tmp_path / "train.jsonl"
    data.write_text("".join(json.dumps({"data_source": "math", "prompt": [{"role": "user", "content": f"{i} + {i}?"}],
                                        "reward_model": {"ground_truth": str(2 * i), "style": "rule"}}) + "\n"
                                for i in range(8)))
    # The update is compiled for the largest length bucket (4,096 tokens); the engine's slots stay short.
    sections = _tiny_rl(tmp_path, **{"model.path": big, "teacher.path": teacher, "model.remat": "none",
                                     "model.attention_block": 0, "train.length_buckets": [4096],
                                     "rollout.num_slots": 8, "rollout.max_assistant_turns": 2,
                                     "tool.max_output_chars": 16, "data.train_files": [str(data)],
                                     "data.max_prompt_length": 1024, "rollout.prefill_buckets": [1024]})
    sections["algo"] = {"name": "grpo"}
    sections["train"]["out_dir"] = str(tmp_path / "run")
    cfg = _config_file(tmp_path, "big", sections)
    err = tmp_path / "stderr"
    import contextlib

    with open(err, "w") as f, contextlib.redirect_stderr(f):
        code = train_cli.main(["--config", str(cfg), "--plan", "v5e:2x2", "--no-progress", "compile.cache_dir=none"])
    lines = [ln for ln in err.read_text().splitlines() if ln.startswith("error:")]
    assert code == 2 and len(lines) == 1, err.read_text()[-3000:]
    assert lines[0].startswith("error: compile.plan=v5e:2x2: does not fit") and "train.micro_batch_size=4" in lines[0]
    assert not (tmp_path / "run" / "checkpoints").exists()
    r = json.loads((tmp_path / "run" / "plan.json").read_text())
    assert r["fits"] is False and r["verdict"].startswith("does not fit") and "the update needs" in r["verdict"]
    assert r["memory"]["resident_update"] > r["target"]["usable_bytes"]
    (knob,) = r["knobs"]
    assert knob["key"] == "train.micro_batch_size" and knob["current"] == 8 and knob["value"] == 4
    assert knob["tried"] == {"8": False, "4": True} and knob["complete"]
    from sod_jax.plan import PlanReport, format_text

    text = format_text(PlanReport(**r))
    assert "knob: train.micro_batch_size (now 8): largest that fits: train.micro_batch_size=4" in text


@needs_tpu
def test_tpu_plan_of_an_sft_config(tmp_path):
    from sod_jax.plan import plan_config

    sections = {"model": {"dtype": "bfloat16", "param_dtype": "float32", "remat": "full", "logprob_chunk": 128,
                          "attention_block": 128},
                "sft": {"init": "cpu-tiny", "train_files": ["unused.parquet"], "max_length": 1024, "batch_size": 16},
                "mesh": {"data": 1, "fsdp": -1, "tensor": 1}}
    path = _config_file(tmp_path, "sft", sections)
    from sod_jax.plan.__main__ import detect_job

    assert detect_job([str(path)]) == "sft"
    r = plan_config(load_config(path, job="sft"), "v5e:2x2", job="sft")
    assert r.job == "sft" and r.fits is True and r.programs[0]["program"] == "sft_step"
    assert r.settings == {"batch_size": 16, "micro_batches": 4, "rows_per_micro": 4, "pack_length": 1024}
    assert r.memory["resident_update"] == r.memory["peak"] > r.memory["params"] + r.memory["optimizer"]


# ---------------------------------------------------------------------------------------------
# The planner's programs are the trainer's
# ---------------------------------------------------------------------------------------------


@pytest.mark.slow
def test_planner_compiles_the_programs_the_trainer_builds(tmp_path):
    """On 4 CPU devices: the update and decode the planner builds from abstract inputs have the same
    memory analysis as the ones built, as the trainer's set-up builds them, from real weights."""
    from flax import nnx

    from sod_jax import parallel
    from sod_jax.models import init_model, load_pretrained, save_pretrained
    from sod_jax.plan.build import engine_kwargs, rl_archs, rl_programs_for
    from sod_jax.plan.planner import compile_program
    from sod_jax.rl import programs as rl_programs
    from sod_jax.rl.update import UpdateSpec, build_update, make_train_state
    from sod_jax.rollout.engine import Engine

    sections = _tiny_rl(tmp_path, **{"train.micro_batch_size": 4})
    # real checkpoints behind the config.json files
    save_pretrained(init_model(Qwen3Config(**TINY), seed=0), sections["model"]["path"])
    save_pretrained(init_model(Qwen3Config(**TINY).replace(hidden_size=96, num_hidden_layers=3), seed=1),
                    sections["teacher"]["path"])
    cfg = load_config(_config_file(tmp_path, "rl", sections))
    stop = (2, 3)
    mesh = parallel.make_mesh(1, -1, 1, devices=jax.devices("cpu")[:4])
    planned = rl_programs_for(cfg, *rl_archs(cfg), mesh, stop_ids=stop)
    plan = {"update": compile_program(planned.update)}
    plan["decode"] = compile_program(next(c for c in planned.engine_calls if c.program.name == "decode"))

    m, t = cfg.model, cfg.teacher
    student = load_pretrained(m.path, dtype=m.dtype, param_dtype=m.param_dtype, mesh=mesh, scan_layers=m.scan_layers,
                              remat=m.remat, attention_block=m.attention_block)
    teacher = load_pretrained(t.path, dtype=t.dtype, param_dtype=t.param_dtype, mesh=mesh, scan_layers=m.scan_layers,
                              remat="none", attention_block=t.attention_block)
    s_graph, params = nnx.split(student)
    t_graph, t_params = nnx.split(teacher)
    tx, state, shardings = make_train_state(cfg, params, 1, mesh)
    update = build_update(UpdateSpec.from_config(cfg), tx, s_graph, t_graph, mesh=mesh, state_shardings=shardings)
    rows, L = 16, 512
    real_update = update.lower(state, t_params, rl_programs.batch_shapes(rows, L, None, mesh)).compile()
    engine = Engine(student, **engine_kwargs(cfg, stop_ids=stop))
    (decode,) = [c for c in engine.program_calls(rl_programs.engine_phases(cfg, True, False))
                 if c.program.name == "decode" and c.label == f"decode {cfg.rollout.num_slots} slots"]
    real_decode = decode.compile()
    assert plan["decode"].label == f"decode {cfg.rollout.num_slots} slots"
    for name, exe in (("update", real_update), ("decode", real_decode)):
        mine, theirs = plan[name], exe.memory_analysis()
        assert mine.compiled, name
        for field, attr in (("argument", "argument_size_in_bytes"), ("output", "output_size_in_bytes"),
                            ("alias", "alias_size_in_bytes"), ("temp", "temp_size_in_bytes")):
            assert getattr(mine, field) == getattr(theirs, attr), (name, field)
