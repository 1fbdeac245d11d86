"""Shared fixtures. Eight fake CPU devices for sharding tests; tiny random HF checkpoints and a small
BPE tokenizer with Qwen3's special tokens are built here (nothing is downloaded)."""

import os

# Parallel test processes (pytest-xdist) get disjoint sandbox uid ranges: the hostile-code tests of
# one must not exhaust the process limit of the other's workers. Subprocesses inherit it.
if os.environ.get("PYTEST_XDIST_WORKER", "").startswith("gw"):
    os.environ["SOD_JAX_SANDBOX_UID_BASE"] = str(61000 + 1000 * int(os.environ["PYTEST_XDIST_WORKER"][2:]))

os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")
os.environ.setdefault("JAX_PLATFORMS", "cpu")  # an installed libtpu (the planner's TPU client) would open a TPU
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import json  # noqa: E402
from pathlib import Path  # noqa: E402

import jax  # noqa: E402
import pytest  # noqa: E402

jax.config.update("jax_default_matmul_precision", "highest")

# Subprocesses (the CLI runs) share one persistent compilation cache: the engine and update programs
# that every train / sft / eval / bench run compiles are compiled once per test session. Set after
# jax is imported, so the test process itself keeps its in-memory cache only.
if "JAX_COMPILATION_CACHE_DIR" not in os.environ:
    import tempfile

    os.environ["JAX_COMPILATION_CACHE_DIR"] = tempfile.mkdtemp(prefix="sod_jax_test_xla_cache_")
    os.environ["JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS"] = "0"
    os.environ["JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES"] = "0"

REPO = Path(__file__).resolve().parents[1]
# Qwen3 facts (the real tokenizer_config.json with its chat template, config presets), kept with the tests.
QWEN3_FACTS = REPO / "tests" / "fixtures" / "qwen3"

# Tiny Qwen3 architectures covering tied/untied heads, GQA ratios 1/2/4, head_dim != hidden/heads
# and two rope_theta values.
TINY_CONFIGS = {
    "tied_gqa1": dict(vocab_size=160, hidden_size=64, intermediate_size=112, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=4, head_dim=16, tie_word_embeddings=True,
                      rope_theta=10000.0),
    "untied_gqa2_hd24": dict(vocab_size=160, hidden_size=64, intermediate_size=96, num_hidden_layers=3,
                             num_attention_heads=4, num_key_value_heads=2, head_dim=24, tie_word_embeddings=False,
                             rope_theta=1_000_000.0),
    "tied_gqa4_hd32": dict(vocab_size=160, hidden_size=48, intermediate_size=80, num_hidden_layers=2,
                           num_attention_heads=8, num_key_value_heads=2, head_dim=32, tie_word_embeddings=True,
                           rope_theta=1_000_000.0),
}


def make_hf_model(seed: int = 0, **kw):
    """A random transformers Qwen3ForCausalLM (fp32, eval mode) with weights large enough to matter."""
    import torch
    from transformers import Qwen3Config, Qwen3ForCausalLM

    torch.manual_seed(seed)
    cfg = Qwen3Config(rms_norm_eps=1e-6, max_position_embeddings=512, bos_token_id=1, eos_token_id=2,
                      attn_implementation="eager", **kw)
    model = Qwen3ForCausalLM(cfg).eval()
    with torch.no_grad():  # non-trivial norms so their mapping is tested too
        for name, p in model.named_parameters():
            if "norm" in name:
                p.copy_(1.0 + 0.2 * torch.randn_like(p))
    return model


@pytest.fixture(scope="session")
def hf_checkpoints(tmp_path_factory):
    """name -> (directory, torch model) for every TINY_CONFIGS entry."""
    out = {}
    for i, (name, kw) in enumerate(TINY_CONFIGS.items()):
        model = make_hf_model(seed=i, **kw)
        d = tmp_path_factory.mktemp(name)
        model.save_pretrained(d)
        out[name] = (d, model)
    return out


QWEN_PRETOKENIZE = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*"
                    r"|\s*[\r\n]+|\s+(?!\S)|\s+")
SPECIAL = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
ADDED = ["<tool_call>", "</tool_call>", "<tool_response>", "</tool_response>", "<think>", "</think>"]


def build_tokenizer(out_dir: Path, vocab_size: int = 600) -> Path:
    """A byte-level BPE with Qwen3's pre-tokenizer and special/added tokens, plus a tokenizer_config.json
    carrying the real Qwen3 chat template."""
    from tokenizers import AddedToken, Regex, Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(QWEN_PRETOKENIZE), behavior="isolated"),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
    ])
    tok.decoder = decoders.ByteLevel()
    corpus = [
        "The answer is \\boxed{42}. Let me compute it with Python.",
        'print(sum(range(10)))\nimport numpy as np\nx = np.arange(5)\n{"name": "code_interpreter", "arguments": {"code": "x"}}',
        "You are a helpful assistant. # Tools\n\nYou may call one or more functions to assist with the user query.",
        "system user assistant tool function description parameters properties required type object string",
    ] * 20
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=SPECIAL,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator(corpus, trainer)
    tok.add_tokens([AddedToken(t, special=False, normalized=False) for t in ADDED])
    out_dir.mkdir(parents=True, exist_ok=True)
    tok.save(str(out_dir / "tokenizer.json"))
    template = json.loads((QWEN3_FACTS / "tokenizer_config.json").read_text())["chat_template"]
    conf = {"tokenizer_class": "PreTrainedTokenizerFast", "eos_token": "<|im_end|>", "pad_token": "<|endoftext|>",
            "bos_token": None, "unk_token": None, "add_bos_token": False, "clean_up_tokenization_spaces": False,
            "model_max_length": 131072, "chat_template": template}
    (out_dir / "tokenizer_config.json").write_text(json.dumps(conf))
    return out_dir


@pytest.fixture(scope="session")
def tokenizer_dir(tmp_path_factory):
    return build_tokenizer(tmp_path_factory.mktemp("tokenizer"))


@pytest.fixture(scope="session")
def tok(tokenizer_dir):
    """The test tokenizer as a :class:`sod_jax.chat.ChatTokenizer`."""
    from sod_jax.chat import ChatTokenizer

    return ChatTokenizer.from_dir(tokenizer_dir)


@pytest.fixture(scope="session")
def sandbox_server():
    """`python -m sod_jax.sandbox serve` on a free loopback port; yields its URL."""
    from support.sandbox_server import spawn_server, stop_server

    proc, url, _ = spawn_server(workers=4)
    yield url
    stop_server(proc)
