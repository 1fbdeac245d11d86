"""Bad checkpoints fail with messages that name the offending file / key / tensor and both shapes."""

import json
import shutil

import numpy as np
import pytest
from safetensors.numpy import load_file, save_file

from sod_jax.models import CheckpointError, load_pretrained


@pytest.fixture
def ckpt(hf_checkpoints, tmp_path):
    src, _ = hf_checkpoints["untied_gqa2_hd24"]
    dst = tmp_path / "ckpt"
    shutil.copytree(src, dst)
    return dst


def edit_config(path, **kw):
    d = json.loads((path / "config.json").read_text())
    d.update(kw)
    (path / "config.json").write_text(json.dumps(d))


def edit_tensors(path, fn):
    tensors = load_file(str(path / "model.safetensors"))
    fn(tensors)
    save_file(tensors, str(path / "model.safetensors"))


def test_unsupported_model_type(ckpt):
    edit_config(ckpt, model_type="llama")
    with pytest.raises(CheckpointError, match=r"config\.json.*model_type 'llama'"):
        load_pretrained(ckpt)


def test_unsupported_architecture(ckpt):
    edit_config(ckpt, architectures=["Qwen3MoeForCausalLM"])
    with pytest.raises(CheckpointError, match="Qwen3MoeForCausalLM"):
        load_pretrained(ckpt)


def test_missing_tensor(ckpt):
    edit_tensors(ckpt, lambda t: t.pop("model.layers.1.mlp.up_proj.weight"))
    with pytest.raises(CheckpointError, match=r"'model\.layers\.1\.mlp\.up_proj\.weight' is missing"):
        load_pretrained(ckpt)


def test_unexpected_tensor(ckpt):
    edit_tensors(ckpt, lambda t: t.update({"model.layers.3.mlp.up_proj.weight": np.zeros((96, 64), np.float32)}))
    with pytest.raises(CheckpointError, match=r"unexpected tensor 'model\.layers\.3\.mlp\.up_proj\.weight'"):
        load_pretrained(ckpt)


def test_shape_mismatch_names_tensor_and_both_shapes(ckpt):
    edit_tensors(ckpt, lambda t: t.update({"model.layers.0.self_attn.k_proj.weight": np.zeros((24, 64), np.float32)}))
    with pytest.raises(CheckpointError) as e:
        load_pretrained(ckpt)
    msg = str(e.value)
    assert "model.layers.0.self_attn.k_proj.weight" in msg and "(24, 64)" in msg and "(48, 64)" in msg


def test_missing_config_and_weights(ckpt):
    (ckpt / "model.safetensors").unlink()
    with pytest.raises(CheckpointError, match="neither model.safetensors nor model.safetensors.index.json"):
        load_pretrained(ckpt)
    (ckpt / "config.json").unlink()
    with pytest.raises(CheckpointError, match="config.json is missing"):
        load_pretrained(ckpt)


def test_missing_shard_named(ckpt, tmp_path):
    index = {"metadata": {}, "weight_map": {"model.embed_tokens.weight": "model-00001-of-00002.safetensors"}}
    (ckpt / "model.safetensors").unlink()
    (ckpt / "model.safetensors.index.json").write_text(json.dumps(index))
    with pytest.raises(CheckpointError, match="model-00001-of-00002.safetensors"):
        load_pretrained(ckpt)


def test_nonexistent_directory(tmp_path):
    with pytest.raises(CheckpointError, match="does not exist"):
        load_pretrained(tmp_path / "nope")


def test_hub_id_offline_says_how_to_pass_a_directory(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(CheckpointError) as e:
        load_pretrained("Qwen/Qwen3-0.6B")
    msg = str(e.value)
    assert "Hub id" in msg and "--local-dir" in msg and "Qwen/Qwen3-0.6B" in msg


def test_sharded_load_peak_host_memory_is_about_one_layer(tmp_path, monkeypatch):
    """8 equal layers, fsdp=8: each device's shard of a stacked weight is one layer's worth, and the
    loader fills it layer slice by layer slice. Host memory beyond what the new arrays keep (on CPU
    they alias host memory) stays well under one layer's tensor for every weight; stacking every
    layer per device, as a whole-tensor reader does, would need 8 layers."""
    import gc
    import tracemalloc

    import jax
    from conftest import make_hf_model
    from safetensors import safe_open

    import sod_jax.models.hf as hf
    from sod_jax import parallel

    D, F, L = 64, 2048, 8
    make_hf_model(seed=0, vocab_size=64, hidden_size=D, intermediate_size=F, num_hidden_layers=L,
                  num_attention_heads=4, num_key_value_heads=2, head_dim=16, tie_word_embeddings=True,
                  rope_theta=10000.0).save_pretrained(tmp_path)
    layer_bytes = F * D * 4  # one layer's gate/up/down tensor in fp32 (the largest)
    mesh = parallel.make_mesh(data=1, fsdp=8, tensor=1)
    transient = {}
    place = hf._place

    def measured(shape, *args):
        before = tracemalloc.get_traced_memory()[0]
        tracemalloc.reset_peak()
        out = jax.block_until_ready(place(shape, *args))
        current, peak = tracemalloc.get_traced_memory()
        transient[shape] = peak - max(current, before)
        return out

    monkeypatch.setattr(hf, "_place", measured)
    gc.collect()
    gc.disable()
    tracemalloc.start()
    try:
        model = load_pretrained(tmp_path, mesh=mesh)
    finally:
        tracemalloc.stop()
        gc.enable()
    assert transient[(L, D, F)] > 0  # really measured
    assert max(transient.values()) < 0.5 * layer_bytes, (transient, layer_bytes)
    gate = model.layers.gate[...]
    assert gate.addressable_shards[0].data.shape == (L, D // 8, F)
    with safe_open(str(tmp_path / "model.safetensors"), framework="numpy") as f:
        np.testing.assert_array_equal(np.asarray(gate[5]), f.get_tensor("model.layers.5.mlp.gate_proj.weight").T)


def test_generation_config_is_copied_or_minimal(hf_checkpoints, tmp_path):
    from sod_jax.models import save_pretrained

    src, _ = hf_checkpoints["tied_gqa1"]
    model = load_pretrained(src)
    save_pretrained(model, tmp_path / "plain")
    assert json.loads((tmp_path / "plain" / "generation_config.json").read_text()) == {"bos_token_id": 1,
                                                                                       "eos_token_id": 2}
    gen = {"bos_token_id": 1, "eos_token_id": [2, 5], "do_sample": True, "temperature": 0.6, "top_p": 0.95}
    (tmp_path / "src").mkdir()
    (tmp_path / "src" / "generation_config.json").write_text(json.dumps(gen))
    save_pretrained(model, tmp_path / "copied", source=tmp_path / "src")
    assert json.loads((tmp_path / "copied" / "generation_config.json").read_text()) == gen
