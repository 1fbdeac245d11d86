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
