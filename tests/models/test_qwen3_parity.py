"""Our Qwen3 against transformers.Qwen3ForCausalLM on tiny random checkpoints (fp32)."""

import jax.numpy as jnp
import numpy as np
import pytest
import torch
from conftest import TINY_CONFIGS, make_hf_model
from transformers import Qwen3ForCausalLM

from sod_jax.models import load_pretrained, save_pretrained

TOL = 1e-4


def batch(kind: str, vocab: int, B: int = 3, T: int = 11, seed: int = 0):
    """ids [B, T], attention mask [B, T] and padding-invariant positions [B, T]."""
    rng = np.random.RandomState(seed)
    ids = rng.randint(0, vocab, (B, T))
    mask = np.ones((B, T), np.int64)
    lengths = [T, T - 3, T - 6]
    for b, n in enumerate(lengths):
        if kind == "left":
            mask[b, : T - n] = 0
        elif kind == "right":
            mask[b, n:] = 0
    pos = np.maximum(np.cumsum(mask, 1) - 1, 0)
    return ids, mask, pos


def hf_logits(model, ids, mask, pos):
    with torch.no_grad():
        return model(torch.tensor(ids), attention_mask=torch.tensor(mask), position_ids=torch.tensor(pos)).logits.numpy()


@pytest.mark.parametrize("name", list(TINY_CONFIGS))
@pytest.mark.parametrize("padding", ["none", "left", "right"])
def test_logits_match_transformers(hf_checkpoints, name, padding):
    path, ref_model = hf_checkpoints[name]
    model = load_pretrained(path)
    ids, mask, pos = batch(padding, TINY_CONFIGS[name]["vocab_size"])
    ref = hf_logits(ref_model, ids, mask, pos)
    # positions are derived from the mask by default; pass nothing but the mask.
    ours = np.asarray(model(jnp.asarray(ids), attention_mask=jnp.asarray(mask)))
    valid = mask.astype(bool)
    assert np.isfinite(ours).all()
    assert np.abs(ours - ref)[valid].max() <= TOL
    # Explicit positions give the same result.
    ours2 = np.asarray(model(jnp.asarray(ids), positions=jnp.asarray(pos), attention_mask=jnp.asarray(mask)))
    np.testing.assert_allclose(ours2[valid], ours[valid], atol=1e-6)


def test_scan_and_unrolled_layers_agree(hf_checkpoints):
    path, _ = hf_checkpoints["untied_gqa2_hd24"]
    ids, mask, _ = batch("left", 160)
    a = load_pretrained(path, scan_layers=True)(jnp.asarray(ids), attention_mask=jnp.asarray(mask))
    b = load_pretrained(path, scan_layers=False, remat="full")(jnp.asarray(ids), attention_mask=jnp.asarray(mask))
    np.testing.assert_allclose(np.asarray(a), np.asarray(b), atol=1e-5)


def test_packed_segments_equal_separate_sequences(hf_checkpoints):
    path, ref_model = hf_checkpoints["tied_gqa4_hd32"]
    model = load_pretrained(path)
    rng = np.random.RandomState(1)
    a, b = rng.randint(0, 160, 7), rng.randint(0, 160, 5)
    packed = np.concatenate([a, b, [0, 0]])[None]
    seg = np.array([[1] * 7 + [2] * 5 + [0, 0]])
    mask = (seg > 0).astype(np.int64)
    out = np.asarray(model(jnp.asarray(packed), attention_mask=jnp.asarray(mask), segment_ids=jnp.asarray(seg)))
    for x, sl in ((a, slice(0, 7)), (b, slice(7, 12))):
        ref = hf_logits(ref_model, x[None], np.ones((1, len(x)), np.int64), np.arange(len(x))[None])
        assert np.abs(out[0, sl] - ref[0]).max() <= TOL


def test_sharded_safetensors_checkpoint_loads(tmp_path):
    ref_model = make_hf_model(seed=7, **TINY_CONFIGS["untied_gqa2_hd24"])
    ref_model.save_pretrained(tmp_path, max_shard_size="40KB")
    assert (tmp_path / "model.safetensors.index.json").is_file()
    assert len(list(tmp_path.glob("model-*.safetensors"))) > 1
    ids, mask, pos = batch("right", 160)
    ours = np.asarray(load_pretrained(tmp_path)(jnp.asarray(ids), attention_mask=jnp.asarray(mask)))
    ref = hf_logits(ref_model, ids, mask, pos)
    assert np.abs(ours - ref)[mask.astype(bool)].max() <= TOL


@pytest.mark.parametrize("name", ["tied_gqa1", "untied_gqa2_hd24"])
def test_save_pretrained_round_trip_loads_in_transformers(hf_checkpoints, tmp_path, name):
    path, ref_model = hf_checkpoints[name]
    model = load_pretrained(path)
    save_pretrained(model, tmp_path)
    for f in ("config.json", "generation_config.json", "model.safetensors"):
        assert (tmp_path / f).is_file()
    reloaded = Qwen3ForCausalLM.from_pretrained(tmp_path).eval()
    ids, mask, pos = batch("left", 160)
    ours = np.asarray(model(jnp.asarray(ids), attention_mask=jnp.asarray(mask)))
    theirs = hf_logits(reloaded, ids, mask, pos)
    assert np.abs(ours - theirs)[mask.astype(bool)].max() <= TOL


def test_save_pretrained_shards_above_size(hf_checkpoints, tmp_path):
    path, ref_model = hf_checkpoints["untied_gqa2_hd24"]
    model = load_pretrained(path)
    save_pretrained(model, tmp_path, max_shard_bytes=50_000)
    assert (tmp_path / "model.safetensors.index.json").is_file()
    assert not (tmp_path / "model.safetensors").exists()
    reloaded = Qwen3ForCausalLM.from_pretrained(tmp_path).eval()
    ids, mask, pos = batch("none", 160)
    np.testing.assert_allclose(hf_logits(reloaded, ids, mask, pos), hf_logits(ref_model, ids, mask, pos), atol=1e-5)
    # and it loads back into ours (sharded read path)
    again = np.asarray(load_pretrained(tmp_path)(jnp.asarray(ids)))
    assert np.abs(again - hf_logits(ref_model, ids, mask, pos)).max() <= TOL


def test_bf16_compute_is_close_to_fp32(hf_checkpoints):
    path, _ = hf_checkpoints["tied_gqa1"]
    ids, mask, _ = batch("none", 160)
    f32 = np.asarray(load_pretrained(path)(jnp.asarray(ids)))
    b16 = load_pretrained(path, dtype="bfloat16", param_dtype="bfloat16")
    assert b16.embed[...].dtype == jnp.bfloat16
    out = np.asarray(b16(jnp.asarray(ids)))
    assert out.dtype == np.float32  # logits are accumulated in fp32
    assert np.abs(out - f32).max() < 0.1 * np.abs(f32).max()
