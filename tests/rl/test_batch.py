"""Trajectory packing: token-space layout, padded rows, length buckets, OPSD alignment."""

from dataclasses import dataclass

import numpy as np
import pytest

from sod_jax.rl.batch import length_buckets, pack, pick_bucket


@dataclass
class T:
    prompt_ids: list
    response_ids: list
    response_mask: list
    logprobs: list


def test_buckets():
    assert length_buckets(1000, 128) == [128, 256, 512, 1000]
    assert length_buckets(128, 128) == [128]
    assert pick_bucket(129, [128, 256]) == 256 and pick_bucket(128, [256, 128]) == 128
    with pytest.raises(ValueError, match="largest length bucket 256"):
        pick_bucket(257, [128, 256])


def test_pack_layout_and_padding_rows():
    a = T([1, 2, 3], [4, 5, 6, 7], [1, 1, 0, 1], [-0.5, -0.25, 0.0, -1.0])
    b = T([8], [9], [1], [-2.0])
    p = pack([a, b], [1.0, -1.0], [0, 0], rows=4, length=8, pad_id=99)
    assert p.shape == (4, 8)
    np.testing.assert_array_equal(p.input_ids[0], [1, 2, 3, 4, 5, 6, 7, 99])
    np.testing.assert_array_equal(p.attention_mask[0], [1] * 7 + [0])
    np.testing.assert_array_equal(p.response_mask[0], [0, 0, 0, 1, 1, 0, 1, 0])
    np.testing.assert_allclose(p.sampler_logp[0], [0, 0, 0, -0.5, -0.25, 0, -1.0, 0])
    np.testing.assert_array_equal(p.input_ids[1], [8, 9] + [99] * 6)
    np.testing.assert_array_equal(p.group_ids, [0, 0, -1, -1])
    np.testing.assert_array_equal(p.row_valid, [True, True, False, False])
    np.testing.assert_array_equal(p.rewards, [1.0, -1.0, 0.0, 0.0])
    np.testing.assert_array_equal(p.response_len, [4, 1, 0, 0])
    assert p.attention_mask[2:].sum() == 0 and p.response_mask[2:].sum() == 0
    with pytest.raises(ValueError, match="has 7 tokens but the batch length is 6"):
        pack([a], [0.0], [0], rows=1, length=6, pad_id=0)
    with pytest.raises(ValueError, match="do not fit"):
        pack([a, b], [0.0, 0.0], [0, 0], rows=1, length=8, pad_id=0)


def test_pack_teacher_index_points_at_the_same_response_tokens():
    a = T([1, 2, 3], [4, 5, 6], [1, 0, 1], [-1.0, 0.0, -1.0])
    p = pack([a], [0.0], [0], rows=1, length=8, pad_id=0, teacher_prompts=[[7, 7, 7, 7, 7]], teacher_length=10)
    idx = p.teacher_index[0]
    for t in range(3, 6):  # student positions of the response
        assert p.teacher_input_ids[0, idx[t]] == p.input_ids[0, t]
    assert (idx[:3] == 0).all() and (idx[6:] == 0).all()
    np.testing.assert_array_equal(p.teacher_attention_mask[0], [1] * 8 + [0, 0])


def test_pack_returns_the_batch_the_update_takes():
    from sod_jax import parallel
    from sod_jax.rl import update
    from sod_jax.rl.batch import RLBatch

    assert update.RLBatch is RLBatch  # one type from packing to the update
    a = T([1, 2, 3], [4, 5, 6], [1, 0, 1], [-1.0, 0.0, -1.0])
    p = pack([a, a], [1.0, 0.0], [0, 0], rows=8, length=8, pad_id=0)
    assert isinstance(p, RLBatch) and isinstance(p.input_ids, np.ndarray)
    assert p.teacher_input_ids is None and p.teacher_index is None and p.teacher_positions is None
    placed = parallel.put_batch(p, parallel.make_mesh(data=2, fsdp=4, tensor=1))
    assert isinstance(placed, RLBatch) and placed.teacher_input_ids is None
    for name in ("input_ids", "attention_mask", "positions", "response_mask", "rewards", "group_ids",
                 "sampler_logp", "row_valid", "response_len"):
        np.testing.assert_array_equal(np.asarray(getattr(placed, name)), getattr(p, name))
        assert getattr(placed, name).sharding.spec[0] == ("data", "fsdp"), name
    t = pack([a], [0.0], [0], rows=1, length=8, pad_id=0, teacher_prompts=[[7, 7]], teacher_length=8)
    assert t.teacher_positions.shape == (1, 8) and t.teacher_attention_mask.shape == (1, 8)
