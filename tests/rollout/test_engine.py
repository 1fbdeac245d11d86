"""The slot engine against transformers generate and our own training-path log-probs."""

import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from conftest import make_hf_model
from flax import nnx

from sod_jax import parallel
from sod_jax.models import load_pretrained
from sod_jax.rl.update import sequence_logprobs
from sod_jax.rollout import Engine, EngineError, Request, SamplingParams, generate
from sod_jax.rollout.sizes import kv_cache_bytes

ARCH = dict(vocab_size=160, hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2, head_dim=16, tie_word_embeddings=False, initializer_range=0.1)


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    hf = make_hf_model(seed=11, **ARCH)
    d = tmp_path_factory.mktemp("engine_model")
    hf.save_pretrained(d)
    hf.generation_config.eos_token_id = None  # compare full 64-token continuations
    return d, hf


def prompts(k=5, seed=0):
    rng = np.random.RandomState(seed)
    return [rng.randint(3, 160, n).tolist() for n in (5, 11, 2, 17, 8, 23, 4)[:k]]


def hf_greedy(hf, p, n):
    with torch.no_grad():
        out = hf.generate(torch.tensor([p]), attention_mask=torch.ones(1, len(p), dtype=torch.long),
                          do_sample=False, max_new_tokens=n, pad_token_id=0)
    return out[0, len(p):].tolist()


@pytest.mark.parametrize("mesh_shape", [None, dict(data=1, fsdp=4, tensor=2)])
def test_greedy_equals_transformers_with_continuous_batching(ckpt, mesh_shape):
    path, hf = ckpt
    mesh = parallel.make_mesh(**mesh_shape) if mesh_shape else None
    model = load_pretrained(path, mesh=mesh)
    if mesh is not None:
        assert model.layers.q[...].sharding.spec == jax.sharding.PartitionSpec(None, "fsdp", "tensor", None)
    engine = Engine(model, num_slots=3, max_len=128, decode_steps=16, prefill_buckets=(8, 16, 32))
    ps = prompts(7)
    outs = generate(engine, [Request(p, max_new_tokens=64, sampling=SamplingParams(greedy=True), id=i)
                            for i, p in enumerate(ps)])  # 7 requests, 3 slots: slots are refilled
    assert [o.request_id for o in outs] == list(range(7))
    for p, o in zip(ps, outs):
        assert o.token_ids == hf_greedy(hf, p, 64)
        assert o.finish_reason == "length" and len(o.logprobs) == 64


# 60: the extension reads a 96-position window, not 64; 200: a 256-wide extension, attended in two
# chunks of 128 tokens (the second reads the first one's cache entries)
@pytest.mark.parametrize("tool_len,max_len", [(5, 96), (60, 96), (200, 256)])
def test_extend_equals_full_prefill(ckpt, tool_len, max_len):
    path, hf = ckpt
    model = load_pretrained(path)
    engine = Engine(model, num_slots=2, max_len=max_len, decode_steps=8, prefill_buckets=(16, 32))
    p = prompts(1)[0]
    prefix = engine.prefill(p)
    engine.insert(prefix, [1], [SamplingParams(greedy=True)], [0], [0], [12])
    generated = [int(engine.state.next_token[1])]
    while True:
        tok, _, emitted, active = engine.step(4)
        generated += tok[emitted[:, 1], 1].tolist()
        if not active[1]:
            break
    assert len(generated) == 12
    tool = [7 + i % 100 for i in range(tool_len)]
    assert engine.capacity == 64
    _, _, _, logits = engine.extend(1, tool, budget=5, return_logits=True)
    assert engine.capacity == {5: 64, 60: 96, 200: 256}[tool_len]  # 16 cached + 61 appended > 64
    full = p + generated + tool
    np.testing.assert_allclose(logits, np.asarray(engine.prefill(full).logits)[0], atol=1e-4)
    with torch.no_grad():
        ref = hf(torch.tensor([full])).logits[0, -1].numpy()
    np.testing.assert_allclose(logits, ref, atol=1e-4)
    # and decoding continues from the extended cache exactly like a fresh prompt would
    tok, _, emitted, _ = engine.step(4)
    cont = tok[emitted[:, 1], 1].tolist()
    first = int(np.argmax(logits))
    assert [first] + cont[:-1] == hf_greedy(hf, full, 4)[: len(cont)]


def test_prefill_beyond_the_attention_block_attends_in_blocks(ckpt, monkeypatch):
    """A prompt bucket longer than ``attention_block`` is prefilled with blocked self-attention (no
    [B, T, C] scores): the logits equal the dense prefill's and transformers', and decoding from that
    cache continues as transformers does."""
    from sod_jax.models import qwen3

    path, hf = ckpt
    traced = []
    real = qwen3.blocked_attention
    monkeypatch.setattr(qwen3, "blocked_attention", lambda q, *a: (traced.append(q.shape), real(q, *a))[1])
    ps = [prompts(1, seed=7)[0] * 4, prompts(1, seed=8)[0]]  # 20 and 5 tokens: one bucket of 32 > block 8
    blocked = Engine(load_pretrained(path, attention_block=8), num_slots=2, max_len=96, decode_steps=8,
                     prefill_buckets=(32,))
    dense = Engine(load_pretrained(path), num_slots=2, max_len=96, decode_steps=8, prefill_buckets=(32,))
    lb, ld = np.asarray(blocked.prefill(ps).logits), np.asarray(dense.prefill(ps).logits)
    assert traced and all(shape[1] == 32 for shape in traced)  # the blocked engine's prefill, every layer
    np.testing.assert_allclose(lb[:2], ld[:2], atol=1e-5)
    with torch.no_grad():
        ref = hf(torch.tensor([ps[0]])).logits[0, -1].numpy()
    np.testing.assert_allclose(lb[0], ref, atol=1e-4)
    outs = generate(blocked, [Request(ps[0], max_new_tokens=12, sampling=SamplingParams(greedy=True))])
    assert outs[0].token_ids == hf_greedy(hf, ps[0], 12)


def test_sampler_logprobs_equal_training_path(ckpt):
    path, _ = ckpt
    model = load_pretrained(path)
    engine = Engine(model, num_slots=4, max_len=64, decode_steps=8, prefill_buckets=(16,))
    sp = SamplingParams(temperature=0.7, top_p=0.9, top_k=40)
    outs = generate(engine, [Request(p, max_new_tokens=20, sampling=sp, seed=3, n=2) for p in prompts(3)])
    graph, params = nnx.split(model)
    for o in outs:
        seq = o.prompt_ids + o.token_ids
        ids = jnp.asarray([seq])
        lp, _ = sequence_logprobs(graph, params, ids, jnp.arange(len(seq))[None], jnp.ones_like(ids), 8)
        np.testing.assert_allclose(np.asarray(lp)[0, len(o.prompt_ids):], o.logprobs, atol=1e-4)


def test_same_seed_same_tokens_whatever_the_batch(ckpt):
    path, _ = ckpt
    model = load_pretrained(path)
    sp = SamplingParams(temperature=1.0)
    target = Request(prompts(1, seed=5)[0], max_new_tokens=24, sampling=sp, seed=42, n=2, id="t")
    alone = generate(Engine(model, num_slots=4, max_len=64, decode_steps=8), [target])
    others = [Request(p, max_new_tokens=n, sampling=SamplingParams(temperature=0.8, top_p=0.7), seed=i)
              for i, (p, n) in enumerate(zip(prompts(4, seed=9), (5, 30, 17, 9)))]
    crowded = generate(Engine(model, num_slots=4, max_len=64, decode_steps=5), others[:3] + [target] + others[3:])
    mine = [o for o in crowded if o.request_id == "t"]
    assert [o.token_ids for o in mine] == [o.token_ids for o in alone]
    assert alone[0].token_ids != alone[1].token_ids  # the two samples differ
    other_seed = generate(Engine(model, num_slots=4, max_len=64), [Request(target.prompt_ids, 24, sp, seed=43)])
    assert other_seed[0].token_ids != alone[0].token_ids


def test_stop_ids_and_budgets(ckpt):
    path, hf = ckpt
    model = load_pretrained(path)
    p = prompts(1)[0]
    ref = hf_greedy(hf, p, 30)
    stop = ref[9]
    first = ref.index(stop)
    engine = Engine(model, num_slots=2, max_len=64, stop_ids=[stop])
    out, = generate(engine, [Request(p, max_new_tokens=30, sampling=SamplingParams(greedy=True))])
    assert out.token_ids == ref[: first + 1] and out.finish_reason == "stop"
    # the slot's cache is the context limit: never generates past it
    small = Engine(model, num_slots=2, max_len=len(p) + 6)
    out, = generate(small, [Request(p, max_new_tokens=30, sampling=SamplingParams(greedy=True))])
    assert out.token_ids == ref[:6] and out.finish_reason == "context"


def test_stop_strings(tokenizer_dir, tmp_path):
    from sod_jax.chat import ChatTokenizer

    tok = ChatTokenizer.from_dir(tokenizer_dir)
    hf = make_hf_model(seed=2, **dict(ARCH, vocab_size=tok.vocab_size))
    hf.save_pretrained(tmp_path)
    model = load_pretrained(tmp_path)
    engine = Engine(model, num_slots=2, max_len=80, tokenizer=tok)
    p = tok.encode("The answer is")
    full, = generate(engine, [Request(p, max_new_tokens=40, sampling=SamplingParams(greedy=True))])
    stop = full.text[10:13]
    cut, = generate(engine, [Request(p, max_new_tokens=40, sampling=SamplingParams(greedy=True), stop_strings=[stop])])
    assert cut.finish_reason == "stop_string" and stop in cut.text
    assert full.token_ids[: len(cut.token_ids)] == cut.token_ids
    assert stop not in tok.decode(cut.token_ids[:-1])  # the shortest prefix that contains it


def test_bad_requests_are_clear_errors(ckpt):
    path, _ = ckpt
    model = load_pretrained(path)
    engine = Engine(model, num_slots=2, max_len=32)
    with pytest.raises(EngineError, match="prompt has 40 tokens but a slot holds 32"):
        generate(engine, [Request(list(range(40)))])
    with pytest.raises(EngineError, match="n=3 samples but there are only 2 decode slots"):
        generate(engine, [Request([1, 2, 3], n=3)])
    need = kv_cache_bytes(model.config, 64, 4096, jnp.float32)
    with pytest.raises(EngineError, match="KV cache needs .* but the budget is"):
        Engine(model, num_slots=64, max_len=4096, kv_budget_bytes=need // 2)


def test_update_params_uses_the_new_arrays(ckpt):
    path, _ = ckpt
    model = load_pretrained(path)
    engine = Engine(model, num_slots=2, max_len=48)
    req = [Request(prompts(1)[0], 16, SamplingParams(greedy=True))]
    before = generate(engine, req)[0].token_ids
    other = load_pretrained(path)
    other.layers.up[...] = other.layers.up[...] * -1.0  # a different policy
    engine.update_params(other)
    after = generate(engine, req)[0].token_ids
    assert after != before
    assert after == generate(Engine(other, num_slots=2, max_len=48), req)[0].token_ids
    # an engine-owned copy: no leaf aliases the model's buffers
    theirs = {a.unsafe_buffer_pointer() for a in jax.tree.leaves(nnx.state(other))}
    assert not theirs & {a.unsafe_buffer_pointer() for a in jax.tree.leaves(engine.params)}


def test_donated_update_then_rollouts_use_the_new_weights(ckpt):
    """The trainer's update donates its params; the engine's sampling copy survives, and after
    update_params the rollout's log-probs are the updated model's."""
    path, _ = ckpt
    model = load_pretrained(path)
    graph, params = nnx.split(model)
    engine = Engine(model, num_slots=4, max_len=64, decode_steps=8, prefill_buckets=(16,))

    update = jax.jit(lambda p: jax.tree.map(lambda x: x * 0.9 + 0.01, p), donate_argnums=(0,))
    new = update(params)
    assert all(x.is_deleted() for x in jax.tree.leaves(params))  # the old buffers are gone
    sp = SamplingParams(temperature=1.0)
    reqs = [Request(p, max_new_tokens=12, sampling=sp, seed=1, n=2) for p in prompts(2)]
    generate(engine, reqs)  # still the old weights, from the engine's own copy: no deleted buffer read
    engine.update_params(new)
    newer = update(new)  # donates `new` too: the engine must not read it any more
    assert all(x.is_deleted() for x in jax.tree.leaves(new))
    outs = generate(engine, reqs)
    for o in outs:
        seq = o.prompt_ids + o.token_ids
        ids = jnp.asarray([seq])
        # the rollout's weights are `new`, recomputed as newer = 0.9 * new + 0.01  =>  new = (newer - 0.01) / 0.9
        ref = jax.tree.map(lambda x: (x - 0.01) / 0.9, newer)
        lp, _ = sequence_logprobs(graph, ref, ids, jnp.arange(len(seq))[None], jnp.ones_like(ids), 8)
        np.testing.assert_allclose(np.asarray(lp)[0, len(o.prompt_ids):], o.logprobs, atol=2e-4)


def test_batched_extension_equals_full_prefill(ckpt):
    """Three finished slots get tool responses of different lengths (two buckets) in one call each;
    each slot's next-token logits equal a full prefill of its whole sequence."""
    path, _ = ckpt
    model = load_pretrained(path)
    engine = Engine(model, num_slots=4, max_len=128, decode_steps=8, prefill_buckets=(32,), extend_buckets=(8, 32))
    ps = prompts(3)
    prefix = engine.prefill(ps)
    budgets = [5, 9, 7]
    engine.insert(prefix, [0, 2, 3], [SamplingParams(greedy=True)] * 3, [0] * 3, [0] * 3, budgets, src=[0, 1, 2])
    gen = {s: [int(engine.state.next_token[s])] for s in (0, 2, 3)}
    while engine.may_generate():
        tok, _, emitted, _ = engine.step(4)
        for s in gen:
            gen[s] += tok[emitted[:, s], s].tolist()
    tools = {0: [9, 8, 7], 2: list(range(20, 40)), 3: [50]}
    calls = []
    real = engine._extend
    engine._extend = lambda *a, **k: (calls.append(a[3].shape), real(*a, **k))[1]
    slots = [0, 2, 3]
    lengths = [len(p) + len(gen[s]) - 1 for p, s in zip(ps, slots)]
    groups = engine.extend_many(slots, [tools[s] for s in slots], [4, 4, 4], lengths=lengths, return_logits=True)
    assert sorted(calls) == [(1, 32), (4, 8)]  # slots 0 and 3 share a bucket (2 rows padded to 4); slot 2 alone
    for idx, (_, _, _, logits) in groups:
        logits = np.asarray(logits)
        for g, j in enumerate(idx):
            s = slots[j]
            full = ps[j] + gen[s] + tools[s]
            np.testing.assert_allclose(logits[g], np.asarray(engine.prefill(full).logits)[0], atol=1e-4)
    assert engine.extend_problem(0, 200, 20) is not None and "overflows" in str(engine.extend_problem(0, 200, 20))


def test_one_forward_in_the_model_file():
    """The engine runs the model's forward; it has no layer loop or attention of its own."""
    import inspect

    import sod_jax.rollout.engine as eng

    src = inspect.getsource(eng)
    for name in ("layer_qkv", "layer_out", "rope_tables", "attention(", "decoder_layer", "rms_norm"):
        assert name not in src, name


def test_default_kv_budget_from_device_memory(ckpt, monkeypatch):
    from sod_jax.rollout import sizes

    path, _ = ckpt
    model = load_pretrained(path)
    need = kv_cache_bytes(model.config, 64, 4096, jnp.float32)
    monkeypatch.setattr(sizes, "device_memory_bytes", lambda device=None: need // 2)
    with pytest.raises(EngineError, match="device's memory.*rollout.num_slots.*rollout.kv_cache_budget_gb"):
        Engine(model, num_slots=64, max_len=4096)
    Engine(model, num_slots=2, max_len=64)  # fits


def test_host_knows_when_budgets_are_spent(ckpt):
    """may_generate turns False exactly when every slot's budget is spent, without a device sync;
    a decode call whose slots all stop early ends there (no tokens emitted after the stop)."""
    path, _ = ckpt
    engine = Engine(load_pretrained(path), num_slots=2, max_len=96, decode_steps=8)
    prefix = engine.prefill(prompts(2))
    engine.insert(prefix, [0, 1], [SamplingParams(greedy=True)] * 2, [0, 0], [0, 0], [6, 11], src=[0, 1])
    calls = 0
    while engine.may_generate():
        tok, _, emitted, active = engine.step(4)
        calls += 1
    assert calls == 3  # 10 more tokens for slot 1 need 3 calls of 4; slot 0 (5 more) is done after 2
    assert not active.any() and emitted[2:, 1].sum() == 0 and emitted[:2, 1].all()
    assert engine.may_generate([0]) is False


def test_read_window_follows_the_live_lengths(ckpt):
    """The cache is allocated once at max_len; each decode call reads the shortest window of the ladder
    that holds the live positions (chosen on device: the program does not change), and the cache is
    freed once every slot is free."""
    path, hf = ckpt
    engine = Engine(load_pretrained(path), num_slots=2, max_len=1000, decode_steps=8)
    assert engine.windows == (64, 128, 256, 512, 1000)
    assert [engine.windows[engine.window_index(n)] for n in (1, 64, 65, 300, 999)] == [64, 64, 128, 512, 1000]
    p = prompts(1)[0]
    seen = []
    real = engine._step
    engine._step = lambda *a, **k: (seen.append(max(int(a[3]), int(a[4]))), real(*a, **k))[1]
    out, = generate(engine, [Request(p, max_new_tokens=70, sampling=SamplingParams(greedy=True))])
    assert out.token_ids == hf_greedy(hf, p, 70)  # the read grows from 64 to 128 positions mid-generation
    assert engine.windows[seen[0]] == 64 and engine.windows[seen[-1]] == 128
    assert len(real.compiled) == 1  # one decode program for every window
    assert engine.state is None  # every slot free: the cache is freed


def test_ragged_decode_with_a_straggler_equals_transformers(ckpt):
    """One long request among short ones: the decode calls read the whole cache only for the tail
    slot (the others stop at the capacity that holds them); tokens still equal transformers and
    log-probs equal an engine without ragged reads."""
    path, hf = ckpt
    model = load_pretrained(path)
    ps = prompts(4, seed=3)
    reqs = [Request(p, max_new_tokens=150 if i == 1 else 10, sampling=SamplingParams(greedy=True), id=i)
            for i, p in enumerate(ps)]
    kw = dict(num_slots=4, max_len=256, decode_steps=16, prefill_buckets=(8, 16, 32), compact_decode=False)
    ragged, plain = Engine(model, tail_slots=1, **kw), Engine(model, tail_slots=0, **kw)
    seen = []
    real = ragged._step
    ragged._step = lambda *a, **k: (seen.append((int(a[3]), int(a[4]))), real(*a, **k))[1]
    outs, ref = generate(ragged, reqs), generate(plain, reqs)
    assert ragged.ragged_calls > 0 and plain.ragged_calls == 0
    assert ragged.windows == (64, 128, 256)
    assert (0, 2) in seen  # the short slots read 64 positions while the straggler reads 256
    for p, r, o, b in zip(ps, reqs, outs, ref):
        assert o.token_ids == b.token_ids == hf_greedy(hf, p, r.max_new_tokens)
        np.testing.assert_allclose(o.logprobs, b.logprobs, atol=1e-5)


def test_compact_decode_of_the_stragglers(ckpt):
    """Once at most a quarter of the slots can still generate, a decode call runs only those
    (gathered into a smaller batch): greedy tokens still equal transformers, and sampled tokens and
    log-probs equal the engine that decodes every slot (per-sample keys do not depend on the batch)."""
    path, hf = ckpt
    model = load_pretrained(path)
    ps = prompts(7) + prompts(1, seed=5)
    kw = dict(num_slots=8, max_len=192, decode_steps=16, prefill_buckets=(8, 16, 32))
    compact, full = Engine(model, **kw), Engine(model, compact_decode=False, **kw)
    for sp in (SamplingParams(greedy=True), SamplingParams(temperature=1.0, top_p=0.9)):
        reqs = [Request(p, max_new_tokens=120 if i == 2 else 6, sampling=sp, seed=i, id=i) for i, p in enumerate(ps)]
        calls = compact.compact_calls
        outs, ref = generate(compact, reqs), generate(full, reqs)
        assert compact.compact_calls > calls and full.compact_calls == 0
        for p, r, o, b in zip(ps, reqs, outs, ref):
            assert o.token_ids == b.token_ids
            np.testing.assert_allclose(o.logprobs, b.logprobs, atol=1e-5)
            if sp.greedy:
                assert o.token_ids == hf_greedy(hf, p, r.max_new_tokens)


@pytest.mark.parametrize("mesh_shape", [dict(data=1, fsdp=8, tensor=1), dict(data=2, fsdp=2, tensor=2)])
def test_slots_split_over_the_devices(ckpt, mesh_shape):
    """On 8 devices the KV cache is split by slots over data x fsdp (and by kv heads over tensor): each
    device holds its share of the slots and decodes them. Greedy tokens equal transformers' and the
    1-device engine's; sampled tokens equal, and log-probs match, the 1-device engine's for the same keys."""
    path, hf = ckpt
    mesh = parallel.make_mesh(**mesh_shape)
    kw = dict(num_slots=16, max_len=96, decode_steps=8, prefill_buckets=(8, 16, 32))
    split, single = Engine(load_pretrained(path, mesh=mesh), **kw), Engine(load_pretrained(path), **kw)
    D = mesh_shape["data"] * mesh_shape["fsdp"]
    assert split.slot_devices == D
    ps = prompts(7)
    for sp in (SamplingParams(greedy=True), SamplingParams(temperature=1.0, top_p=0.9)):
        reqs = [Request(p, max_new_tokens=20, sampling=sp, seed=i, n=2, id=i) for i, p in enumerate(ps)]
        seen = []
        real = split._insert
        split._insert = lambda *a, **k: (seen.append(a[1].k[0]), real(*a, **k))[1]
        outs, ref = generate(split, reqs), generate(single, reqs)
        split._insert = real
        k0 = seen[0]  # [S, K, H, M], as the decode programs read it
        assert k0.sharding.shard_shape(k0.shape)[0] == 16 // D
        assert k0.sharding.shard_shape(k0.shape)[1] == 2 // mesh_shape["tensor"]
        for r, o, b in zip([r for r in reqs for _ in range(2)], outs, ref):
            assert o.token_ids == b.token_ids
            np.testing.assert_allclose(o.logprobs, b.logprobs, atol=1e-5)
            if sp.greedy:
                assert o.token_ids == hf_greedy(hf, r.prompt_ids, 20)


@pytest.mark.parametrize("mesh_shape", [dict(data=1, fsdp=8, tensor=1), dict(data=2, fsdp=2, tensor=2)])
def test_extension_runs_per_device_group(ckpt, mesh_shape):
    """With the slots split over device groups, one extension call over slots of several groups (two
    of them on one group, in no particular order, two tool-text buckets) runs each group's rows
    against its own part of the cache: the logits after the tool text, the outputs' order and the
    decode after it equal the 1-device engine's, and transformers' on the whole sequence."""
    path, hf = ckpt
    mesh = parallel.make_mesh(**mesh_shape)
    kw = dict(num_slots=16, max_len=128, decode_steps=4, prefill_buckets=(16, 32))
    split, single = Engine(load_pretrained(path, mesh=mesh), **kw), Engine(load_pretrained(path), **kw)
    assert split.slot_groups() is not None and single.slot_groups() is None
    D = mesh_shape["data"] * mesh_shape["fsdp"]
    assert split.extend_rows_ladder()[0] == D
    slots = [1, 0, 9, 15, 8]
    assert len({split.slot_device(s) for s in slots}) >= 3
    ps = prompts(5)
    tools = [[7 + (i * 13 + j) % 100 for j in range(n)] for i, n in enumerate((5, 40, 3, 20, 33))]
    seqs, logits, after = {}, {}, {}
    batches = []
    real = split._extend
    split._extend = lambda *a, **k: (batches.append(np.asarray(a[2])), real(*a, **k))[1]
    for name, eng in (("split", split), ("single", single)):
        seq = {}
        for p, s in zip(ps, slots):
            eng.insert(eng.prefill(p), [s], [SamplingParams(greedy=True)], [0], [0], [6])
            seq[s] = list(p) + [int(eng.state.next_token[s])]
        while True:
            tok, _, emitted, active = eng.step(4)
            for s in slots:
                seq[s] += tok[emitted[:, s], s].tolist()
            if not active[slots].any():
                break
        seqs[name] = {s: list(v) for s, v in seq.items()}
        got = {}
        for idx, out in eng.extend_many(slots, tools, [5] * 5, return_logits=True):
            out = jax.device_get(out)
            for n, j in enumerate(idx):
                got[slots[j]] = (int(out[0][n]), np.asarray(out[3][n]))
        logits[name] = got
        cont = {s: [got[s][0]] for s in slots}
        for _ in range(2):
            tok, _, emitted, _ = eng.step(4)
            for s in slots:
                cont[s] += tok[emitted[:, s], s].tolist()
        after[name] = cont
    split._extend = real
    assert len(batches) == 2  # one call per tool-text bucket; each batch grouped by device group
    for rows in batches:
        g = len(rows) // D
        for d in range(D):
            assert all(split.slot_device(int(r)) == d for r in rows[d * g:(d + 1) * g] if r < 16)
    assert seqs["split"] == seqs["single"] and after["split"] == after["single"]
    for s, tool in zip(slots, tools):
        np.testing.assert_allclose(logits["split"][s][1], logits["single"][s][1], atol=1e-5)
        assert logits["split"][s][0] == int(np.argmax(logits["split"][s][1]))
    s, tool = slots[3], tools[3]
    full = seqs["single"][s] + tool
    with torch.no_grad():
        ref = hf(torch.tensor([full])).logits[0, -1].numpy()
    np.testing.assert_allclose(logits["split"][s][1], ref, atol=1e-4)
    assert after["split"][s] == hf_greedy(hf, full, len(after["split"][s]))


@pytest.mark.parametrize("mesh_shape,slots", [(dict(data=1, fsdp=8, tensor=1), 32), (dict(data=1, fsdp=4, tensor=2), 16)])
def test_ragged_and_compact_decode_run_per_device_group(ckpt, mesh_shape, slots):
    """With the slots split over device groups, the ragged and the compact decode plans are made per
    group: a compact call decodes the same number of slots of every group (group-major, each group
    gathers only its own rows), the tail rows are chosen in each group; tokens equal the 1-device
    engine's and transformers', log-probs the 1-device engine's (the stragglers' groups decode
    longer than the others: with tensor-parallel weights the groups must stay in step). With
    replicated weights the compiled decode programs move no cache rows between devices: their only
    collective is the scalar "any slot still active" of the loop."""
    path, hf = ckpt
    mesh = parallel.make_mesh(**mesh_shape)
    kw = dict(num_slots=slots, max_len=192, decode_steps=8, prefill_buckets=(8, 16, 32))
    split, single = Engine(load_pretrained(path, mesh=mesh), **kw), Engine(load_pretrained(path), **kw)
    D = split.group_count()
    assert D == mesh_shape["fsdp"] and split.compact_sizes() == [D * (slots // D // 4)]
    ps = prompts(7) * (slots // 7 + 1)
    long = np.random.RandomState(9).randint(3, 160, 60).tolist()  # the stragglers read past 64 positions early
    calls = []
    real_rows, real_step = split._step_rows, split._step
    split._step_rows = lambda *a, **k: (calls.append(("rows", np.asarray(a[2]), a[3])), real_rows(*a, **k))[1]
    split._step = lambda *a, **k: (calls.append(("all", None, a[2])), real_step(*a, **k))[1]
    for sp in (SamplingParams(greedy=True), SamplingParams(temperature=1.0, top_p=0.9)):
        # Two stragglers on different groups (requests fill the least-loaded group first).
        reqs = [Request(long[:60 - i] if i in (1, 2) else p, max_new_tokens=90 if i in (1, 2) else 12, sampling=sp,
                        seed=i, id=i) for i, p in enumerate(ps[:slots])]
        outs, ref = generate(split, reqs), generate(single, reqs)
        for r, o, b in zip(reqs, outs, ref):
            assert o.token_ids == b.token_ids
            np.testing.assert_allclose(o.logprobs, b.logprobs, atol=1e-5)
            if sp.greedy and r.max_new_tokens == 90:
                assert o.token_ids == hf_greedy(hf, r.prompt_ids, 90)
    split._step_rows, split._step = real_rows, real_step
    assert split.compact_calls > 0 and split.ragged_calls > 0
    compact = [rows for kind, rows, _ in calls if kind == "rows"]
    for rows in compact:
        g = len(rows) // D
        assert len(rows) == D * g and all(split.slot_device(int(r)) == d for d in range(D)
                                          for r in rows[d * g:(d + 1) * g])
    tails = [tail for kind, _, tail in calls if kind == "all" and tail is not None]
    assert tails and all(len(t) == D * split._tail_count(slots) for t in tails)
    if mesh_shape["tensor"] == 1:
        for prog in (split._step, split._step_rows):
            for exe in prog.compiled.values():
                hlo = exe.as_text()
                assert not any(op in hlo for op in ("all-gather", "all-to-all", "collective-permute"))
                reduces = [ln for ln in hlo.splitlines() if " all-reduce(" in ln]
                assert reduces and all(re.search(r"= (s32|pred)\[\] all-reduce\(", ln) for ln in reduces), reduces


def test_new_requests_go_to_the_least_loaded_device(ckpt):
    from sod_jax.rollout.scheduler import SlotScheduler

    path, _ = ckpt
    engine = Engine(load_pretrained(path, mesh=parallel.make_mesh(data=1, fsdp=4, tensor=2)), num_slots=8,
                    max_len=64, decode_steps=8, prefill_buckets=(8,))
    sched = SlotScheduler(engine)
    first = sched.acquire(4)
    assert sorted(engine.slot_device(s) for s in first) == [0, 1, 2, 3]
    sched.release(first[0])
    again = sched.acquire(1)
    assert engine.slot_device(again[0]) == engine.slot_device(first[0])
