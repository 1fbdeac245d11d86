"""The mechanism probe on tiny random models: the constructed trajectories' structure, the figures
against a direct re-computation (log-softmax of full logits, per-turn d_k and w_k by the formula),
and the gradient effect against finite differences."""


import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from sod_jax.chat import ChatTokenizer
from sod_jax.demo import check_task
from sod_jax.demo.probe import DECISION, build_trajectories, gradient_effect, measure, measure_clean, turn_spans
from sod_jax.models import init_model
from sod_jax.models.qwen3 import Qwen3Config

TOKENIZER = "sod_jax/demo/assets/tokenizer"


@pytest.fixture(scope="module")
def setup():
    tok = ChatTokenizer.from_dir(TOKENIZER)
    arch = Qwen3Config(vocab_size=tok.vocab_size, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                       num_attention_heads=2, num_key_value_heads=1, head_dim=16, dtype="float32",
                       param_dtype="float32", eos_token_id=2, bos_token_id=0)
    student, teacher = init_model(arch, seed=0), init_model(arch, seed=1)
    problems = check_task.make_splits(0, 3, seed=21)[1]
    trajs = build_trajectories(problems, tok, seed=4)
    return tok, student, teacher, trajs


def test_trajectories_hold_an_error_its_traceback_and_the_redo(setup):
    tok, _, _, trajs = setup
    for t in trajs:
        spans = turn_spans(t.mask)
        assert len(spans) == len(t.attempts) + 1  # the tool turns and the answer
        bad = t.attempts[t.error_turn]
        assert not bad.passes() and "AssertionError" in t.outputs[t.error_turn]
        assert t.attempts[t.error_turn + 1].redo and t.attempts[t.error_turn + 1].k == bad.k
        r0 = spans[t.error_turn + 1][0]
        assert tok.decode(list(t.ids[r0:r0 + t.decision_len])) == DECISION


def _naive_logp(model, ids):
    logits = np.asarray(model(jnp.asarray(ids)[None]))[0]  # [T, V], full vocabulary
    lsm = logits - np.log(np.exp(logits - logits.max(-1, keepdims=True)).sum(-1, keepdims=True)) - \
        logits.max(-1, keepdims=True)
    return np.concatenate([[0.0], lsm[np.arange(len(ids) - 1), ids[1:]]])


def test_figures_equal_a_direct_recomputation(setup):
    _, student, teacher, trajs = setup
    eps, delta = 1e-6, 0.2
    r = measure(student, teacher, trajs, eps=eps, delta=delta, gradients=False)
    gaps, w_redo, d_first, p_redo_t = [], [], [], []
    d_before, w_before, d_after, w_after = [], [], [], []
    for t in trajs:
        s, q = _naive_logp(student, t.ids), _naive_logp(teacher, t.ids)
        spans = turn_spans(t.mask)
        d = [np.mean(np.abs(s[a:b] - q[a:b])) for a, b in spans]  # d_k: mean |s - q| over turn k's tokens
        w = [1.0] + [min((d[0] + eps) / (d[k] + eps), 1 + delta) for k in range(1, len(d))]
        r0, r1 = spans[t.error_turn + 1]
        gaps.append(q[r0:r1] - s[r0:r1])
        w_redo.append(w[t.error_turn + 1])
        d_first.append(d[0])
        p_redo_t.append(np.exp(np.float64(q[r0:r0 + t.decision_len].sum())))
        e = t.error_turn  # tool turns done right: before e, and after the redo e + 1 (the answer turn excluded)
        d_before += [d[j] for j in range(e)]
        w_before += [w[j] for j in range(1, e)]
        d_after += [d[j] for j in range(e + 2, len(t.attempts))]
        w_after += [w[j] for j in range(e + 2, len(t.attempts))]
    assert d_before and d_after, "the fixture should hold steps on both sides of an error"
    for key, direct in (("d_before", d_before), ("w_before", w_before), ("d_after", d_after), ("w_after", w_after)):
        if direct:
            np.testing.assert_allclose(r[key], np.mean(direct), rtol=1e-4, err_msg=key)
        else:
            assert r[key] is None, key
    np.testing.assert_allclose(r["q_minus_s_redo_tokens"], np.mean(np.concatenate(gaps)), rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(r["w_redo"], np.mean(w_redo), rtol=1e-4)
    np.testing.assert_allclose(r["d_first"], np.mean(d_first), rtol=1e-4)
    np.testing.assert_allclose(r["p_redo_teacher"], np.mean(p_redo_t), rtol=1e-3)
    assert r["trajectories"] == len(trajs)


def test_clean_figures_equal_a_direct_recomputation(setup):
    """Error-free trajectories of the same problems: d_1 and the later tool steps' d_k / w_k."""
    tok, student, teacher, _ = setup
    problems = check_task.make_splits(0, 3, seed=21)[1]
    clean = build_trajectories(problems, tok, seed=4, recover=False)
    assert all(t.error_turn == -1 and t.decision_len == 0 and all(a.passes() for a in t.attempts) for t in clean)
    eps, delta = 1e-6, 0.2
    r = measure_clean(student, teacher, clean, eps=eps, delta=delta)
    d_first, d_later, w_later = [], [], []
    for t in clean:
        s, q = _naive_logp(student, t.ids), _naive_logp(teacher, t.ids)
        d = [np.mean(np.abs(s[a:b] - q[a:b])) for a, b in turn_spans(t.mask)]
        d_first.append(d[0])
        for k in range(1, len(t.attempts)):  # the tool steps after the first; the answer turn left out
            d_later.append(d[k])
            w_later.append(min((d[0] + eps) / (d[k] + eps), 1 + delta))
    np.testing.assert_allclose(r["clean_d_first"], np.mean(d_first), rtol=1e-4)
    np.testing.assert_allclose(r["clean_d_later"], np.mean(d_later), rtol=1e-4)
    np.testing.assert_allclose(r["clean_w_later"], np.mean(w_later), rtol=1e-4)
    assert r["clean_trajectories"] == len(clean)


def test_gradient_effect_matches_finite_differences(setup):
    _, student, teacher, trajs = setup
    t = trajs[0]
    graph, params = nnx.split(student)
    params = jax.tree_util.tree_map(lambda x: x.astype(jnp.float32), params)
    ids = jnp.asarray(t.ids)[None]
    attn = jnp.ones_like(ids)
    rng = np.random.default_rng(0)
    spans = turn_spans(t.mask)
    r0, r1 = spans[t.error_turn + 1]
    redo = np.zeros((1, len(t.ids)), np.float32)
    redo[0, r0:r1] = 1.0
    adv = (rng.normal(size=(1, len(t.ids))) * t.mask).astype(np.float32)
    res = gradient_effect(graph, params, ids, attn, jnp.asarray(adv), jnp.asarray(redo))

    from sod_jax.rl.update import sequence_logprobs

    def f(p, weights):
        return float(jnp.sum(weights * sequence_logprobs(graph, p, ids, None, attn, 256)[0]))

    g = jax.grad(lambda p: jnp.sum(jnp.asarray(adv) * sequence_logprobs(graph, p, ids, None, attn, 256)[0]))(params)
    h = 1e-2 / float(res["norm_term"])  # float32: smaller steps drown in rounding, larger in curvature
    plus = jax.tree_util.tree_map(lambda x, d: x + h * d, params, g)
    minus = jax.tree_util.tree_map(lambda x, d: x - h * d, params, g)
    fd = (f(plus, redo) - f(minus, redo)) / (2 * h)  # d/dh log pi(redo) along g
    np.testing.assert_allclose(float(res["inner"]), fd, rtol=2e-2)
    # the term's gradient itself, along a random direction
    v = jax.tree_util.tree_map(lambda x: jnp.asarray(rng.normal(size=x.shape), jnp.float32), params)
    vn = float(np.sqrt(sum(float(jnp.sum(x * x)) for x in jax.tree_util.tree_leaves(v))))
    h = 1e-2 / vn
    plus = jax.tree_util.tree_map(lambda x, d: x + h * d, params, v)
    minus = jax.tree_util.tree_map(lambda x, d: x - h * d, params, v)
    fd = (f(plus, adv) - f(minus, adv)) / (2 * h)
    dot = sum(float(jnp.sum(a * b)) for a, b in zip(jax.tree_util.tree_leaves(g), jax.tree_util.tree_leaves(v)))
    np.testing.assert_allclose(dot, fd, rtol=2e-2)
    assert -1.0 <= float(res["cos"]) <= 1.0 and float(res["norm_redo"]) > 0
    # with the weights all ones on the redo tokens only, the term's gradient is r itself: cos = 1
    same = gradient_effect(graph, params, ids, attn, jnp.asarray(redo), jnp.asarray(redo))
    np.testing.assert_allclose(float(same["cos"]), 1.0, rtol=1e-4)


def test_measure_reports_the_gradient_figures(setup):
    _, student, teacher, trajs = setup
    r = measure(student, teacher, trajs[:2], gradients=True)
    for k in ("opd_inner", "opd_cos", "sod_inner", "sod_cos"):
        assert r[k] is not None and np.isfinite(r[k])
    assert -1 <= r["opd_cos"] <= 1 and -1 <= r["sod_cos"] <= 1


def test_probe_cli_on_saved_checkpoints(setup, tmp_path, capsys):
    import json
    import shutil

    from sod_jax.demo.__main__ import main
    from sod_jax.models import save_pretrained

    _, student, teacher, _ = setup
    dirs = {}
    for name, model in (("student", student), ("teacher", teacher)):
        dirs[name] = tmp_path / name
        save_pretrained(model, dirs[name])
        for f in ("tokenizer.json", "tokenizer_config.json"):
            shutil.copy(f"{TOKENIZER}/{f}", dirs[name] / f)
    heldout = tmp_path / "heldout.parquet"
    check_task.write_parquet([check_task.rl_row(p, i, "heldout")
                              for i, p in enumerate(check_task.make_splits(0, 3, seed=21)[1])], heldout)
    out = tmp_path / "probe.json"
    assert main(["probe", "--student", str(dirs["student"]), "--teacher", str(dirs["teacher"]), "--heldout",
                 str(heldout), "--n", "2", "--no-gradients", "--json", str(out)]) == 0
    r = json.loads(out.read_text())
    assert r["trajectories"] == 2 and r["opd_inner"] is None and np.isfinite(r["q_minus_s_redo_tokens"])
    assert r["clean_trajectories"] == 2 and np.isfinite(r["clean_w_later"])
    printed = capsys.readouterr().out
    assert "P(redo decision after a failed check): teacher" in printed and "without an error: d_1" in printed
