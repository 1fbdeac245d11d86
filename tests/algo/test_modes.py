"""The one table of algorithm modes against what each mode's code actually does, and its users:
config validation, the update's spec and the one overlong penalty."""

import subprocess
import sys
import typing

import jax.numpy as jnp
import numpy as np
import pytest

from sod_jax.algo import modes
from sod_jax.algo.advantages import overlong_penalty, token_advantages
from sod_jax.config import AlgoConfig, ConfigError, load_config
from sod_jax.rl.update import UpdateSpec


def _advantages(mode, *, q=None, w=None, **kw):
    rng = np.random.RandomState(0)
    B, T = 4, 6
    A = rng.randn(B).astype(np.float32)
    m = np.ones((B, T), np.float32)
    s = -rng.exponential(1.0, (B, T)).astype(np.float32)
    q = -rng.exponential(1.0, (B, T)).astype(np.float32) if q is None else q
    w = rng.rand(B, T).astype(np.float32) if w is None else w
    return np.asarray(token_advantages(mode, A, m, s, q, w, **kw))


@pytest.mark.parametrize("name", modes.NAMES)
def test_table_says_which_modes_read_q_and_weights(name):
    mode = modes.get(name)
    nan = np.full((4, 6), np.nan, np.float32)
    q_nan = np.isnan(_advantages(name, q=nan))  # every token is in the mask: q reaches all or none
    assert q_nan.all() if mode.teacher_logp else not q_nan.any()
    w_nan = np.isnan(_advantages(name, w=nan))
    assert w_nan.all() if mode.weights is not None else not w_nan.any()


def test_table_facts():
    assert modes.NAMES == ("grpo", "opd", "sod", "gated_opd", "opsd_gt", "opsd_hint", "iw_opd")
    assert [n for n in modes.NAMES if modes.uses_teacher_logp(n)] == [n for n in modes.NAMES if n != "grpo"]
    assert modes.without_teacher_model() == ("grpo", "opsd_gt", "opsd_hint")
    assert [n for n in modes.NAMES if modes.self_teacher(n)] == ["opsd_gt", "opsd_hint"]
    # a loaded teacher and a privileged context exclude each other; both imply q
    for m in modes.TABLE:
        assert not (m.teacher_model and m.self_teacher)
        assert m.teacher_logp or not (m.teacher_model or m.self_teacher)
    row = {"ground_truth": 42, "extra_info": {"hint": "try 6 * 7"}}
    assert modes.get("opsd_gt").privileged_text(row) == "42"
    assert modes.get("opsd_hint").privileged_text(row) == "try 6 * 7"
    assert modes.get("opsd_hint").privileged_text({"ground_truth": 42}) == "42"
    with pytest.raises(ValueError, match="uses no privileged context"):
        modes.get("sod").privileged_text(row)
    with pytest.raises(ValueError, match="unknown algorithm mode 'ppo'; known: grpo, opd"):
        modes.get("ppo")


def test_update_spec_reads_the_table():
    for name in modes.NAMES:
        spec = UpdateSpec(mode=name)
        assert spec.needs_teacher == modes.get(name).teacher_logp
        assert spec.self_teacher == modes.get(name).self_teacher


def test_config_accepts_the_table_names_and_refuses_a_missing_teacher():
    assert typing.get_args(typing.get_type_hints(AlgoConfig)["name"]) == modes.NAMES
    for name in modes.NAMES:
        if modes.needs_teacher_model(name):
            with pytest.raises(ConfigError, match=f"algo.name={name} needs a teacher: set teacher.path "
                                                  r"\(or use algo.name=grpo / opsd_gt / opsd_hint\)"):
                load_config(overrides=[f"algo.name={name}"])
            load_config(overrides=[f"algo.name={name}", "teacher.path=/some/teacher"])
            load_config(overrides=[f"algo.name={name}"], job="eval")  # only training needs the teacher
        else:
            load_config(overrides=[f"algo.name={name}"])
    with pytest.raises(ConfigError, match="algo.name"):
        load_config(overrides=["algo.name=ppo"])


def test_config_stays_a_leaf_without_jax():
    code = "import sys, sod_jax.config; bad = [m for m in sys.modules if m == 'jax' or m.startswith('jax.')]; " \
           "extra = sorted(m for m in sys.modules if m.startswith('sod_jax') and m not in " \
           "('sod_jax', 'sod_jax.config', 'sod_jax.algo', 'sod_jax.algo.modes')); print(bad, extra)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "[] []"


def _trainer_formula(length, max_len, buffer, factor):
    """The RL trainer's reward shaping before it used the one definition (Python floats)."""
    expected = max_len - buffer
    return min(-(length - expected) / buffer, 0.0) * factor


def _eval_formula(length, max_len, buffer, factor):
    """evaluate.py's definition before it used the one definition."""
    if buffer <= 0:
        return 0.0
    return min(-(length - (max_len - buffer)) / buffer * factor, 0.0)


@pytest.mark.parametrize("max_len,buffer,factor", [(20480, 1024, 1.0), (200, 50, 2.0), (200, 50, 0.5), (64, 1, 1.0)])
def test_overlong_penalty_is_the_old_ones_exactly(max_len, buffer, factor):
    lengths = [0, 1, max_len - buffer - 1, max_len - buffer, max_len - buffer + 1, max_len - 1, max_len, max_len + 7]
    for n in lengths:
        got = overlong_penalty(n, max_len, buffer, factor)
        assert isinstance(got, float)
        assert got == _trainer_formula(n, max_len, buffer, factor) == _eval_formula(n, max_len, buffer, factor)
    want = np.asarray([_trainer_formula(n, max_len, buffer, factor) for n in lengths], np.float32)
    got_np = overlong_penalty(np.asarray(lengths), max_len, buffer, factor)
    got_jax = overlong_penalty(jnp.asarray(lengths), max_len, buffer, factor)
    assert isinstance(got_np, np.ndarray) and got_np.dtype == np.float32
    assert isinstance(got_jax, jnp.ndarray) and got_jax.dtype == jnp.float32
    np.testing.assert_allclose(got_np, want, rtol=1e-6)
    np.testing.assert_allclose(np.asarray(got_jax), want, rtol=1e-6)


def test_overlong_penalty_without_a_buffer_is_zero():
    assert overlong_penalty(10_000, 200, 0, 1.0) == 0.0
    np.testing.assert_array_equal(overlong_penalty(np.asarray([1, 10_000]), 200, 0), [0.0, 0.0])
    np.testing.assert_array_equal(np.asarray(overlong_penalty(jnp.asarray([1, 10_000]), 200, 0)), [0.0, 0.0])


def test_one_overlong_penalty_everywhere():
    from sod_jax.evaluation import evaluate
    from sod_jax.rl import trainer

    assert evaluate.overlong_penalty is overlong_penalty
    assert trainer.overlong_penalty is overlong_penalty
