"""Typed configuration tree: YAML files, dotted overrides, validation.

The tree is a set of frozen-free dataclasses, one per section (``model``, ``teacher``, ``data``,
``rollout``, ``tool``, ``sandbox``, ``reward``, ``algo``, ``optim``, ``train``, ``mesh``,
``distributed``, ``checkpoint``, ``logging``, ``eval``, ``sft``, ``compile``). Every field has a
default reproducing the paper's SOD run (DESIGN §1.1) and a help string; ``python -m
sod_jax.config`` prints the reference.

Loading order: defaults <- YAML file(s) <- ``section.key=value`` overrides. Any unknown key, wrong
type or impossible combination raises :class:`ConfigError` whose message names the key, where it
came from (file or command line) and, for unknown keys, the nearest valid key.

This module is a leaf: it imports nothing from the rest of ``sod_jax`` but the pure-data table of
algorithm modes, :mod:`sod_jax.algo.modes` (plain Python, no jax, no other ``sod_jax`` import):
``algo.name`` accepts the table's names and validation asks it which modes need ``teacher.path``.
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import difflib
import json
import sys
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, Optional, Union

import yaml

from sod_jax.algo import modes as algo_modes


class ConfigError(ValueError):
    """A configuration problem the user must fix; the message says what and where."""


def _f(default: Any, help: str, implemented: bool = True) -> Any:  # noqa: A002 - `help` reads best in the field list
    """A dataclass field with a default and a help string (lists, dicts and nested sections get a
    factory). ``implemented=False``: the key is documented and accepted at its default, but any
    other value fails with "not implemented yet" (never silently ignored)."""
    meta = {"help": help, "implemented": implemented}
    if dataclasses.is_dataclass(default):
        return field(default_factory=lambda d=default: copy.deepcopy(d), metadata=meta)
    if isinstance(default, (list, dict)):
        return field(default_factory=lambda d=default: json.loads(json.dumps(d)), metadata=meta)
    return field(default=default, metadata=meta)


# ---------------------------------------------------------------------------------------------
# Sections
# ---------------------------------------------------------------------------------------------


@dataclass
class ModelConfig:
    """The student policy."""

    path: Optional[str] = _f(None, "HF checkpoint directory (or Hub id when online) of the cold-start SFT student.")
    tokenizer: Optional[str] = _f(None, "Directory with tokenizer.json / tokenizer_config.json (None: model.path).")
    dtype: Literal["float32", "bfloat16", "float16"] = _f("bfloat16", "Compute dtype of activations and matmuls.")
    param_dtype: Literal["float32", "bfloat16"] = _f("float32", "Dtype of the master weights.")
    scan_layers: bool = _f(True, "Run the decoder layers with lax.scan over stacked weights (flat compile time).")
    remat: Literal["none", "full", "dots"] = _f("full", "Rematerialisation per layer in the backward pass: none, full, or save only matmul outputs (dots).")
    logprob_chunk: int = _f(256, "Sequence chunk for sampled-token log-probs; never materialises [B, T, V].")
    attention_block: int = _f(512, "Sequences longer than this run causal attention in blocks of this many tokens (O(T x block) memory, masked blocks skipped; student and teacher); 0 = always dense [T, T].")


@dataclass
class TeacherConfig:
    """The frozen teacher used by opd / sod / gated_opd."""

    path: Optional[str] = _f(None, "HF checkpoint directory of the teacher (the paper: a GRPO-trained Qwen3-4B).")
    param_dtype: Literal["float32", "bfloat16"] = _f("bfloat16", "Dtype the frozen teacher weights are stored in.")
    dtype: Literal["float32", "bfloat16", "float16"] = _f("bfloat16", "Compute dtype of the teacher forward pass.")
    logprob_chunk: int = _f(256, "Sequence chunk for the teacher's sampled-token log-probs (its own, as the teacher may be larger than the student).")
    attention_block: int = _f(512, "Teacher sequences longer than this run causal attention in blocks of this many tokens; 0 = always dense [T, T].")


@dataclass
class DataConfig:
    """Prompt data (parquet/jsonl)."""

    train_files: list[str] = _f([], "RL training parquet/jsonl files (Open-AgentRL-30K style rows).")
    val_files: list[str] = _f([], "Validation files (Open-AgentRL-Eval style rows).")
    prompt_key: str = _f("prompt", "Column holding the chat messages of the prompt.")
    max_prompt_length: int = _f(2560, "Prompts longer than this many tokens are dropped (counted in metrics).")
    prompt_templates: dict[str, str] = _f({}, "data_source -> prompt template: a name in configs/prompts/ (math, gpqa, livecodebench) or a path to a jinja2 file; sources not listed pass through as given.")
    shuffle: bool = _f(True, "Shuffle the training prompts each epoch.")
    seed: int = _f(1, "Seed of the data order (the reference's run: 1).")
    on_bad_row: Literal["error", "skip"] = _f("error", "Malformed row: stop with an error naming file, row and column (error), or skip and count it (skip).")


@dataclass
class RolloutConfig:
    """The slot sampler that produces trajectories."""

    n: int = _f(16, "Rollouts per prompt (the GRPO group size).")
    temperature: float = _f(1.0, "Sampling temperature for training rollouts.")
    top_p: float = _f(1.0, "Nucleus mass for training rollouts (1.0: off).")
    top_k: int = _f(-1, "Top-k for training rollouts (-1: off).")
    max_response_length: int = _f(20480, "Response budget per trajectory: assistant plus tool tokens.")
    max_assistant_turns: int = _f(16, "Assistant turns per trajectory.")
    enable_thinking: bool = _f(True, "Render prompts with Qwen3 thinking mode on.")
    num_slots: int = _f(256, "Concurrent decode slots (each holds one trajectory's KV cache).")
    decode_steps: int = _f(32, "Tokens generated per slot per device call.")
    prefill_buckets: list[int] = _f([256, 512, 1024, 2048, 4096], "Prompt lengths are padded up to one of these to bound recompiles.")
    extend_buckets: list[int] = _f([32, 128, 512], "Tool-response lengths are padded up to one of these when appended to a slot's cache (one device call per bucket per agent advance).")
    compact_decode: bool = _f(True, "When at most a quarter of the slots can still generate (a batch's stragglers), decode only those (gathered into a smaller batch) instead of every slot.")
    tail_slots: int = _f(-1, "Ragged decode: only this many of the longest slots read the whole KV cache in a decode call; the others read up to the capacity that holds them, so a straggler does not make every slot read its length (-1: num_slots/8, at least 1; 0: off).")
    kv_cache_budget_gb: float = _f(0.0, "Refuse to start if the KV cache needs more than this, checked from the student's config.json before any weights load; the error names the largest rollout.num_slots that fits (0: 90% of the device memory less the sampling weights; no check on CPU).")
    stop_strings: list[str] = _f([], "Extra strings that end an assistant turn (the agent stops on <|im_end|> / eos only).", implemented=False)


@dataclass
class ToolConfig:
    """How tool calls are parsed, executed and shown back to the model."""

    name: str = _f("code_interpreter", "The one tool the agent may call.")
    extract_code_block: bool = _f(True, "Run the first fenced python block when the argument contains one.")
    print_last_expression: bool = _f(True, "Print the value of a final top-level expression (decided with ast).")
    max_output_chars: int = _f(256, "A tool text longer than this keeps its first truncate_head and last truncate_tail characters around '...(truncated)...' (the reference's rule).")
    truncate_head: Optional[int] = _f(None, "Characters kept from the start of a truncated tool text (null: max_output_chars // 2, the reference's 128).")
    truncate_tail: Optional[int] = _f(None, "Characters kept from the end of a truncated tool text (null: max_output_chars // 2, the reference's 128).")
    max_parallel_calls: int = _f(1, "Tool calls executed per assistant turn; the rest are dropped (end) or reported as not executed (observe).")
    on_parse_error: Literal["observe", "end"] = _f("end", "end (the reference): run the turn's valid calls, drop malformed ones silently, end the episode only when no call is valid, answer an unknown tool name 'Error when executing tool: ...'; observe: answer every malformed call with an error observation so the model can recover (recommended for training new students).")
    failure_text: Literal["reference", "descriptive"] = _f("reference", "Tool text of a run that did not finish: 'no stdout here' (reference) or what went wrong plus any partial output (descriptive).")
    description: str = _f("A tool for executing code.", "The tool's description in the schema rendered into the system prompt (default: the reference's text).")
    parameter_description: str = _f("The code to execute.", "The description of the 'code' parameter in that schema (default: the reference's text).")


@dataclass
class SandboxConfig:
    """Where model-written code runs."""

    backend: Literal["local", "fusion"] = _f("local", "local: isolated worker pool; fusion: SandboxFusion-compatible HTTP server.")
    url: str = _f("http://127.0.0.1:8080", "Base URL of the fusion server.")
    workers: int = _f(8, "Local executor worker processes.")
    mode: Literal["warm", "cold"] = _f("warm", "local: warm forks each run from a pre-started isolated interpreter per worker (numpy/sympy imported); cold starts a new sandbox and interpreter per run.")
    max_concurrency: int = _f(64, "Global bound on sandbox calls in flight.")
    run_timeout: float = _f(60.0, "Wall-clock seconds per execution (the reference's run: 60).")
    memory_limit_mb: int = _f(2048, "Address-space limit per execution in MB (the reference's run: 2048).")
    retries: int = _f(3, "fusion: retries on connection errors, 429 and 5xx (never on other 4xx).")
    allow_unconfined: bool = _f(False, "Run without isolation when no mechanism works (unsafe: only for trusted code).")


@dataclass
class RewardConfig:
    """Outcome rewards."""

    overlong_buffer: bool = _f(True, "Apply the DAPO overlong penalty.")
    overlong_buffer_len: int = _f(1024, "Penalty ramp length: expected = max_response_length - buffer.")
    overlong_penalty_factor: float = _f(1.0, "Scale of the overlong penalty.")
    math_verify: bool = _f(False, "Use math_verify equivalence instead of strict last-\\boxed{} match.")
    workers: int = _f(8, "Reward process-pool size.")
    timeout: float = _f(30.0, "Seconds one item may take to score (a math-verify check, or all test cases of a code answer); past it the item scores as wrong and is counted.")
    case_timeout: float = _f(6.0, "code: wall-clock seconds per test case in the sandbox.")
    sources: dict[str, str] = _f({}, "Extra data_source -> scorer (math, choice, code) mappings on top of the built-in sources.")


@dataclass
class AlgoConfig:
    """Advantage mode and PPO loss (DESIGN §1.1-1.2)."""

    name: Literal[algo_modes.NAMES] = _f("sod", "Advantage mode (iw_opd: TRL's position-weighted OPD, per token instead of SOD's per step).")
    grpo_term: bool = _f(True, "opd/sod: include the GRPO outcome advantage (false: pure OPD).")
    opd_coef: float = _f(1.0, "c: scale of the distillation term.")
    eps: float = _f(1e-6, "SOD: epsilon in (d_1+eps)/(d_k+eps).")
    delta: float = _f(0.2, "SOD: step weights are clipped to 1+delta.")
    adv_eps: float = _f(1e-6, "GRPO: added to the group std.")
    clip_low: float = _f(0.2, "PPO ratio clip below 1.")
    clip_high: float = _f(0.28, "PPO ratio clip above 1 (clip-higher).")
    dual_clip: float = _f(3.0, "Dual-clip bound for negative advantages (0: off).")
    log_ratio_clamp: float = _f(20.0, "log(ratio) is clamped to +-this before exp.")
    loss_agg: Literal["token-mean", "seq-mean-token-mean"] = _f("token-mean", "Loss aggregation over the mini-batch.")
    beta_min: float = _f(0.0, "gated_opd: smallest distillation weight.")
    beta_max: float = _f(0.1, "gated_opd: largest distillation weight (the reference's 0.1); beta_max <= beta_min drops the distillation term, as the reference does.")
    gamma: float = _f(1.0, "gated_opd: sigmoid slope on -A_i.")
    opsd_template: str = _f("{prompt}\n\nReference: {privileged}", "opsd_*: how privileged text joins the last user message.")
    iw_opd_gamma: float = _f(0.5, "iw_opd: weight amplification; token t gets 1 + gamma * (1 - prefix |q-s| before t / row total).")
    iw_opd_epsilon: float = _f(1e-8, "iw_opd: lower bound of the row total in that ratio.")
    rollout_is: Literal["none", "token", "sequence"] = _f("none", "Rollout importance correction of the policy loss for sampler/trainer mismatch: weights min(exp(old_logp - sampler_logp), rollout_is_cap) per token, or per sequence (exp of the row's summed log-ratio).")
    rollout_is_cap: float = _f(2.0, "Upper bound of the rollout importance weights (truncated importance sampling).")


@dataclass
class OptimConfig:
    """AdamW."""

    lr: float = _f(1e-6, "Learning rate.")
    schedule: Literal["constant", "cosine"] = _f("constant", "Learning-rate schedule after warmup.")
    warmup_steps: int = _f(0, "Linear warmup steps.")
    b1: float = _f(0.9, "Adam beta1.")
    b2: float = _f(0.999, "Adam beta2.")
    weight_decay: float = _f(0.01, "Decoupled weight decay.")
    grad_clip: float = _f(1.0, "Global-norm gradient clip.")


@dataclass
class TrainConfig:
    """The RL loop."""

    prompts_per_step: int = _f(64, "Prompts per RL step (x rollout.n trajectories).")
    mini_batches: int = _f(4, "PPO mini-batches per step (one optimizer update each); rows are dealt to them in turn (row r to mini-batch r % mini_batches).")
    micro_batch_size: int = _f(0, "Trajectories per micro-batch across the whole mesh (gradients accumulated over a mini-batch's micro-batches, same result as unsplit); 0 = one micro-batch per mini-batch. Also bounds the old-policy and teacher forward passes.")
    epochs: int = _f(1, "PPO epochs: passes of the update over each step's rollouts (mini_batches x epochs optimizer steps per RL step).")
    total_epochs: int = _f(1, "Passes over the training data (the reference's run: 1); the step count is derived from the data size.")
    total_steps: Optional[int] = _f(None, "RL steps to run; null or 0: derived, total_epochs x steps per epoch of the data.")
    seed: int = _f(0, "Seed of sampling and initialisation.")
    out_dir: str = _f("runs/sod", "Run directory: metrics.jsonl, resolved config, plots, checkpoints.")
    eval_every: int = _f(10, "Validate every N steps (0: never; the reference's run: 10).")
    length_buckets: list[int] = _f([], "Sequence lengths the update is compiled for (each step pads to the smallest that fits); empty: powers of two from 128 up to data.max_prompt_length + rollout.max_response_length.")


@dataclass
class MeshConfig:
    """Device mesh (DESIGN §4 Scale-out). -1 fills the remaining devices."""

    data: int = _f(1, "Pure data parallelism (replicated params).")
    fsdp: int = _f(-1, "Fully sharded data parallelism (params sharded on the embed axis).")
    tensor: int = _f(1, "Tensor parallelism (heads, mlp and vocab axes).")


@dataclass
class DistributedConfig:
    """Multi-controller start-up (``jax.distributed.initialize``), done by every CLI that computes
    (train, sft, eval, generate). On TPU pod slices, under SLURM (``srun``, more than one task) and
    with ``JAX_COORDINATOR_ADDRESS`` / ``JAX_NUM_PROCESSES`` / ``JAX_PROCESS_ID`` set, leave
    coordinator, num_processes and process_id unset: the cluster is detected. Set them to override
    the detection; ``num_processes: 1`` forces a single process."""

    coordinator: Optional[str] = _f(None, "host:port of process 0's coordination service (None: auto-detect).")
    num_processes: Optional[int] = _f(None, "Number of processes (None: auto-detect; 1: single process, no initialisation).")
    process_id: Optional[int] = _f(None, "This process's index in [0, num_processes) (None: auto-detect).")
    initialization_timeout: int = _f(300, "Seconds every process waits for all others to join the coordination service before failing.")
    heartbeat_timeout: int = _f(100, "Seconds without a heartbeat after which a process is declared dead and the job fails.")
    shutdown_timeout: int = _f(300, "Seconds a finishing process waits at the shutdown barrier for the others.")


@dataclass
class CheckpointConfig:
    """orbax checkpoints (train state + JSON extra), resume and preemption; SFT and RL alike."""

    dir: Optional[str] = _f(None, "Checkpoint directory (None: <train.out_dir>/checkpoints, for SFT <sft.out_dir>/checkpoints).")
    save_every: int = _f(10, "Save every N steps (the reference's run: 10); a save also follows the last step and a SIGTERM/SIGINT.")
    keep: int = _f(3, "Keep the last N checkpoints.")
    resume: bool = _f(True, "Resume from the newest readable checkpoint in dir (an unreadable newer one is moved to <step>.unreadable with a warning).")
    async_save: bool = _f(True, "Write in a background thread; the loop blocks only for the device-to-host copy (reported as checkpoint_blocking_s).")


@dataclass
class LoggingConfig:
    """Where metrics go."""

    log_every: int = _f(1, "Log every N steps.")
    tensorboard: bool = _f(False, "Also write TensorBoard events.")
    wandb: bool = _f(False, "Also log to Weights & Biases.")
    project: str = _f("sod_jax", "wandb project.")
    plots: bool = _f(True, "Write PNG learning curves and step-weight plots.")


@dataclass
class EvalConfig:
    """Evaluation (avg@k, pass@k, maj@k)."""

    files: list[str] = _f([], "Eval parquet files (Open-AgentRL-Eval rows).")
    n: int = _f(32, "Samples per prompt.")
    ks: list[int] = _f([1, 4, 8, 16, 32], "k values reported for pass@k / maj@k.")
    temperature: float = _f(1.0, "Sampling temperature (0: greedy decoding).")
    top_p: float = _f(0.6, "Nucleus mass.")
    max_response_length: int = _f(20480, "Response budget per sample.")
    max_prompt_length: int = _f(4096, "Eval prompts longer than this many tokens are dropped (the reference's eval: 4096; long GPQA/LiveCodeBench prompts exceed the training 2560).")
    kl_prompts: int = _f(0, "RL eval: also measure the student-teacher reverse KL (k1 on student rollouts) on the first N held-out prompts (0: off).")
    chunk_prompts: int = _f(0, "Prompts per agent run; each finished chunk is appended to generations.jsonl (what a killed eval keeps). 0: enough to fill the decode slots 4 times.")
    overlong_buffer_len: int = _f(0, "DAPO overlong penalty in the reported reward (not acc): linear from 0 at max_response_length - this to -factor at max_response_length (0: off).")
    overlong_penalty_factor: float = _f(1.0, "Scale of the eval overlong penalty.")
    seed: int = _f(0, "python -m sod_jax.eval: sampling seed (a prompt's samples depend only on it, the prompt and the sample index).")
    out_dir: str = _f("runs/eval", "python -m sod_jax.eval: where generations.jsonl, summary.json and summary.md go (rerun to resume).")


@dataclass
class SFTConfig:
    """Cold-start SFT (`python -m sod_jax.sft`) of model.path (model.* sets dtype/remat/chunk, mesh.* the mesh)."""

    train_files: list[str] = _f([], "SFT parquet/jsonl files: rows with `messages` (system/user/assistant with optional tool_calls/tool) and optional `tools`.")
    val_files: list[str] = _f([], "Held-out conversations for the periodic held-out loss (empty: none, or sft.val_fraction of the train rows).")
    val_fraction: float = _f(0.0, "With no sft.val_files: hold out this fraction of the train rows (chosen by sft.seed).")
    tokenizer: Optional[str] = _f(None, "Directory with tokenizer.json + tokenizer_config.json (None: model.path); copied into every exported checkpoint.")
    init: Optional[str] = _f(None, "Start from random weights of this architecture instead of model.path: a preset name (e.g. cpu-tiny) or an HF config.json path.")
    init_overrides: dict[str, Any] = _f({}, "sft.init: architecture fields to override, e.g. {num_hidden_layers: 2, vocab_size: 512}.")
    max_length: int = _f(32768, "Longest conversation in tokens (chat-template rendering incl. the tool system block).")
    overlong: Literal["drop", "truncate"] = _f("drop", "Conversations longer than sft.max_length: drop them, or keep their first max_length tokens (counted either way).")
    pack_length: int = _f(0, "Tokens per packed row (0: sft.max_length). Conversations are packed into rows with segment ids; attention never crosses a segment.")
    batch_size: int = _f(128, "Conversations per optimizer step (the global batch).")
    micro_batch_rows: int = _f(0, "Packed rows per forward/backward pass (0: one per batch-parallel device); the step accumulates gradients over as many as the batch needs.")
    epochs: int = _f(5, "Passes over the train rows.")
    max_steps: int = _f(0, "Stop after this many optimizer steps (0: sft.epochs decide); also the cosine horizon when smaller.")
    lr: float = _f(1e-5, "Peak learning rate.")
    min_lr_ratio: float = _f(0.0, "Cosine decay ends at lr * this.")
    warmup_ratio: float = _f(0.1, "Fraction of the optimizer steps spent in linear warmup from 0.")
    schedule: Literal["cosine", "constant"] = _f("cosine", "Learning-rate schedule after warmup.")
    b1: float = _f(0.9, "Adam beta1.")
    b2: float = _f(0.95, "Adam beta2.")
    weight_decay: float = _f(0.01, "Decoupled weight decay (AdamW).")
    grad_clip: float = _f(1.0, "Global-norm gradient clip.")
    seed: int = _f(0, "Seed of the data order, the held-out split and sft.init weights.")
    shuffle: bool = _f(True, "Shuffle the conversations every epoch.")
    eval_every: int = _f(0, "Held-out loss every N optimizer steps (0: only at the end; needs held-out rows).")
    early_stop_patience: int = _f(0, "Stop when the held-out loss has not improved for this many evaluations (0: never).")
    save_every: int = _f(0, "Export an HF checkpoint to <out_dir>/hf/step_N every N steps (0: only the final one, <out_dir>/model).")
    out_dir: str = _f("runs/sft", "Run directory: config.yaml, metrics.jsonl, plots/, hf/, model/.")
    enable_thinking: bool = _f(True, "Passed to the chat template as enable_thinking (Qwen3's only uses it for generation prompts).")
    accuracy_files: list[str] = _f([], "Held-out RL-layout prompt rows (data.* filters apply) for the tool-using accuracy during SFT: the model's rollouts through the agent loop (rollout.*, tool.*, sandbox.*) scored by the reward registry (reward.*).")
    accuracy_prompts: int = _f(64, "Use the first N rows of sft.accuracy_files (0: all).")
    accuracy_every: int = _f(0, "Held-out tool-using accuracy every N optimizer steps (0: never; needs sft.accuracy_files). Written to accuracy.jsonl.")
    accuracy_after_loss: float = _f(1.0e9, "Measure the accuracy only once the last training loss is below this (early evaluations of a random model are wasted time).")
    accuracy_temperature: float = _f(0.0, "Sampling temperature of the accuracy rollouts (0: greedy).")
    accuracy_max_response_length: int = _f(256, "Response budget (assistant + tool tokens) of an accuracy rollout.")
    stop_accuracy_at_least: Optional[float] = _f(None, "Stop (and export <out_dir>/model) at the first accuracy >= this (None: off).")
    stop_accuracy_band: list[float] = _f([], "[low, high]: stop at the first accuracy inside it, e.g. a student with headroom for RL (empty: off).")
    snapshot_accuracy_band: list[float] = _f([], "[low, high]: export the first checkpoint whose accuracy is inside it to sft.snapshot_out and go on (one run gives a weaker and a stronger model; empty: off).")
    snapshot_out: Optional[str] = _f(None, "Where the sft.snapshot_accuracy_band checkpoint goes (HF format + tokenizer files).")


@dataclass
class CompileConfig:
    """XLA compilation: the persistent cache that lets a restarted run skip recompiling."""

    warmup: bool = _f(False, "RL: compile every program of the run before step 1 (the engine's programs for the rollouts, eval and held-out KL, the update and the held-out KL forward per length bucket; from abstract inputs, with a progress bar), so no step stalls on a compilation; with cache_dir a restart loads them instead.")
    plan: str = _f("", "Pre-flight capacity plan for a target (v5e-8, v4-32, v5e:2x4, 8xH100, cpu:N; see python -m sod_jax.plan): before any weights load, train / sft compile the run's programs for it from abstract inputs, write <out_dir>/plan.json and refuse (exit 2, naming the knob to turn) a config that does not fit. Empty = no plan. --plan TARGET sets it.")
    cache_dir: str = _f("", "Persistent compilation cache (every program, however small or quick to compile): empty = <train.out_dir>/xla_cache for python -m sod_jax.train, <sft.out_dir>/xla_cache for sod_jax.sft, <eval.out_dir>/xla_cache for sod_jax.eval; a directory or gs:// URL; none = off. JAX_COMPILATION_CACHE_DIR in the environment takes precedence.")


@dataclass
class Config:
    """The whole tree."""

    model: ModelConfig = field(default_factory=ModelConfig)
    teacher: TeacherConfig = field(default_factory=TeacherConfig)
    data: DataConfig = field(default_factory=DataConfig)
    rollout: RolloutConfig = field(default_factory=RolloutConfig)
    tool: ToolConfig = field(default_factory=ToolConfig)
    sandbox: SandboxConfig = field(default_factory=SandboxConfig)
    reward: RewardConfig = field(default_factory=RewardConfig)
    algo: AlgoConfig = field(default_factory=AlgoConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    mesh: MeshConfig = field(default_factory=MeshConfig)
    distributed: DistributedConfig = field(default_factory=DistributedConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    logging: LoggingConfig = field(default_factory=LoggingConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    sft: SFTConfig = field(default_factory=SFTConfig)
    compile: CompileConfig = field(default_factory=CompileConfig)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def to_yaml(self) -> str:
        return yaml.safe_dump(self.to_dict(), sort_keys=False)


# ---------------------------------------------------------------------------------------------
# Type checking and coercion
# ---------------------------------------------------------------------------------------------


def _type_name(tp: Any) -> str:
    origin = typing.get_origin(tp)
    if origin is Literal:
        return "one of " + ", ".join(repr(a) for a in typing.get_args(tp))
    if origin in (Union, types.UnionType):
        return " or ".join(_type_name(a) for a in typing.get_args(tp))
    if origin is list:
        (inner,) = typing.get_args(tp)
        return f"list of {_type_name(inner)}"
    if origin is dict:
        k, v = typing.get_args(tp)
        return f"mapping of {_type_name(k)} to {_type_name(v)}"
    if tp is Any:
        return "any"
    if dataclasses.is_dataclass(tp):
        return f"{tp.__name__} mapping"
    return "null" if tp is type(None) else getattr(tp, "__name__", str(tp))


class _BadNested(TypeError):
    """A problem inside a nested value: ``path`` (``.field``, ``[key]``, ``[0]``) and what is wrong."""

    def __init__(self, path: str, msg: str):
        super().__init__(msg)
        self.path, self.msg = path, msg


def _coerce_in(value: Any, tp: Any, path: str) -> Any:
    """:func:`_coerce` of an element at ``path``: errors say where inside the value they are."""
    try:
        return _coerce(value, tp)
    except _BadNested as e:
        raise _BadNested(path + e.path, e.msg) from None
    except TypeError:
        raise _BadNested(path, f"must be {_type_name(tp)}, got {value!r} ({type(value).__name__})") from None


def _coerce(value: Any, tp: Any) -> Any:
    """Return ``value`` as type ``tp`` or raise TypeError; ints are accepted for floats only.
    Nested dataclasses are built from mappings (unknown fields rejected, by name)."""
    origin = typing.get_origin(tp)
    if dataclasses.is_dataclass(tp):
        if dataclasses.is_dataclass(value) and isinstance(value, tp):
            value = dataclasses.asdict(value)
        if not isinstance(value, dict):
            raise TypeError
        known = _fields(tp)
        out = tp()
        for k, v in value.items():
            if k not in known:
                raise _BadNested(f".{k}", f"unknown field; valid fields: {', '.join(known)}")
            setattr(out, k, _coerce_in(v, known[k][1], f".{k}"))
        return out
    if origin is Literal:
        if value in typing.get_args(tp):
            return value
        raise TypeError
    if origin in (Union, types.UnionType):
        for arg in typing.get_args(tp):
            try:
                return _coerce(value, arg)
            except TypeError:
                continue
        raise TypeError
    if origin is list:
        (inner,) = typing.get_args(tp)
        if not isinstance(value, (list, tuple)):
            raise TypeError
        return [_coerce_in(v, inner, f"[{i}]") for i, v in enumerate(value)]
    if origin is dict:
        k_tp, v_tp = typing.get_args(tp)
        if not isinstance(value, dict):
            raise TypeError
        return {_coerce(k, k_tp): _coerce_in(v, v_tp, f"[{k!r}]") for k, v in value.items()}
    if tp is Any:
        return value
    if tp is type(None):
        if value is None:
            return None
        raise TypeError
    if tp is bool:
        if isinstance(value, bool):
            return value
        raise TypeError
    if tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        raise TypeError
    if tp is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        if isinstance(value, str):  # YAML 1.1 reads "3e-6" (no dot) as a string
            try:
                return float(value)
            except ValueError:
                raise TypeError from None
        raise TypeError
    if tp is str:
        if isinstance(value, str):
            return value
        raise TypeError
    raise TypeError


def _fields(cls: type) -> dict[str, tuple[dataclasses.Field, Any]]:
    hints = typing.get_type_hints(cls)
    return {f.name: (f, hints[f.name]) for f in dataclasses.fields(cls)}


def _all_keys() -> list[str]:
    keys = []
    for sec, (_, sec_tp) in _fields(Config).items():
        keys.append(sec)
        keys.extend(f"{sec}.{name}" for name in _fields(sec_tp))
    return keys


def _unknown(key: str, source: str) -> ConfigError:
    near = difflib.get_close_matches(key, _all_keys(), n=1, cutoff=0.5)
    hint = f"; did you mean '{near[0]}'?" if near else f"; valid sections: {', '.join(_fields(Config))}"
    return ConfigError(f"unknown config key '{key}' in {source}{hint}")


def _set(cfg: Config, key: str, value: Any, source: str) -> None:
    parts = key.split(".")
    if len(parts) != 2:
        if len(parts) == 1 and parts[0] in _fields(Config):
            raise ConfigError(f"config key '{key}' in {source} is a section; set its fields, e.g. '{key}.<field>'")
        raise _unknown(key, source)
    sec, name = parts
    sections = _fields(Config)
    if sec not in sections:
        raise _unknown(key, source)
    sec_obj = getattr(cfg, sec)
    fields = _fields(type(sec_obj))
    if name not in fields:
        raise _unknown(key, source)
    tp = fields[name][1]
    try:
        setattr(sec_obj, name, _coerce(value, tp))
    except _BadNested as e:
        raise ConfigError(f"config key '{key}{e.path}' in {source}: {e.msg}") from None
    except TypeError:
        raise ConfigError(
            f"config key '{key}' in {source} must be {_type_name(tp)}, got {value!r} ({type(value).__name__})"
        ) from None


def _apply_mapping(cfg: Config, data: Any, source: str) -> None:
    if data is None:
        return
    if not isinstance(data, dict):
        raise ConfigError(f"{source} must hold a mapping of sections, got {type(data).__name__}")
    for sec, body in data.items():
        if sec not in _fields(Config):
            raise _unknown(str(sec), source)
        if not isinstance(body, dict):
            raise ConfigError(f"config section '{sec}' in {source} must be a mapping of fields, got {body!r}")
        for name, value in body.items():
            _set(cfg, f"{sec}.{name}", value, source)


# ---------------------------------------------------------------------------------------------
# Public API
# ---------------------------------------------------------------------------------------------


def parse_override(text: str) -> tuple[str, Any]:
    """Split ``section.key=value``; the value is parsed as YAML (``0.5``, ``true``, ``[1, 2]``, ``null``)."""
    if "=" not in text:
        raise ConfigError(f"override '{text}' (command line) must look like section.key=value")
    key, raw = text.split("=", 1)
    try:
        value = yaml.safe_load(raw) if raw.strip() else ""
    except yaml.YAMLError:
        value = raw
    return key.strip(), value


def load_config(paths: Union[str, Path, list, None] = None, overrides: Optional[list[str]] = None,
                job: str = "train") -> Config:
    """Defaults <- YAML file(s) in order <- dotted overrides; then :func:`validate` for ``job``."""
    cfg = Config()
    if paths is None:
        paths = []
    elif isinstance(paths, (str, Path)):
        paths = [paths]
    for p in paths:
        p = Path(p)
        if not p.is_file():
            raise ConfigError(f"config file '{p}' does not exist")
        try:
            data = yaml.safe_load(p.read_text())
        except yaml.YAMLError as e:
            raise ConfigError(f"config file '{p}' is not valid YAML: {e}") from None
        _apply_mapping(cfg, data, f"file '{p}'")
    for text in overrides or []:
        key, value = parse_override(text)
        _set(cfg, key, value, f"override '{text}' (command line)")
    sources = [f"file '{p}'" for p in paths] + (["command-line overrides"] if overrides else [])
    validate(cfg, " + ".join(sources) or "defaults", job=job)
    return cfg


def from_dict(data: dict, source: str = "dict", job: str = "train") -> Config:
    """Build and validate a Config from a nested mapping (e.g. a saved resolved config)."""
    cfg = Config()
    _apply_mapping(cfg, data, source)
    validate(cfg, source, job=job)
    return cfg


def validate(cfg: Config, source: str = "config", job: str = "train") -> None:
    """Reject values and combinations that cannot run; each message names the key(s) and ``source``.
    ``job`` is the CLI the config is for (``train``, ``sft``, ``eval``): RL-only checks apply to ``train``."""
    problems = []

    def need(cond: bool, msg: str) -> None:
        if not cond:
            problems.append(msg)

    a, r, t = cfg.algo, cfg.rollout, cfg.train
    mode = algo_modes.MODES.get(a.name)
    need(job != "train" or mode is None or not mode.teacher_model or bool(cfg.teacher.path),
         f"algo.name={a.name} needs a teacher: set teacher.path (or use algo.name="
         f"{' / '.join(algo_modes.without_teacher_model())})")
    need(a.eps > 0, f"algo.eps must be > 0, got {a.eps}")
    need(a.delta >= 0, f"algo.delta must be >= 0, got {a.delta}")
    need(0 <= a.clip_low < 1, f"algo.clip_low must be in [0, 1), got {a.clip_low}")
    need(a.clip_high >= 0, f"algo.clip_high must be >= 0, got {a.clip_high}")
    need(a.dual_clip == 0 or a.dual_clip > 1, f"algo.dual_clip must be 0 (off) or > 1, got {a.dual_clip}")
    need(a.iw_opd_gamma >= 0, f"algo.iw_opd_gamma must be >= 0, got {a.iw_opd_gamma}")
    need(a.iw_opd_epsilon > 0, f"algo.iw_opd_epsilon must be > 0, got {a.iw_opd_epsilon}")
    need(a.rollout_is_cap > 0, f"algo.rollout_is_cap must be > 0, got {a.rollout_is_cap}")
    need(t.total_epochs >= 1, f"train.total_epochs must be >= 1, got {t.total_epochs}")
    need(t.total_steps is None or t.total_steps >= 0,
         f"train.total_steps must be null or 0 (derived from the data) or > 0, got {t.total_steps}")
    need(r.n >= 1, f"rollout.n must be >= 1, got {r.n}")
    need(r.temperature > 0, f"rollout.temperature must be > 0, got {r.temperature}")
    need(0 < r.top_p <= 1, f"rollout.top_p must be in (0, 1], got {r.top_p}")
    need(r.top_k == -1 or r.top_k >= 1, f"rollout.top_k must be -1 (off) or >= 1, got {r.top_k}")
    need(r.max_response_length >= 1, f"rollout.max_response_length must be >= 1, got {r.max_response_length}")
    need(r.max_assistant_turns >= 1, f"rollout.max_assistant_turns must be >= 1, got {r.max_assistant_turns}")
    need(r.num_slots >= 1, f"rollout.num_slots must be >= 1, got {r.num_slots}")
    need(job != "train" or r.num_slots >= r.n, f"rollout.num_slots ({r.num_slots}) must be >= rollout.n ({r.n}): a GRPO group is decoded at once")
    need(t.prompts_per_step >= 1, f"train.prompts_per_step must be >= 1, got {t.prompts_per_step}")
    need(t.mini_batches >= 1 and t.prompts_per_step % t.mini_batches == 0,
         f"train.prompts_per_step ({t.prompts_per_step}) must be divisible by train.mini_batches ({t.mini_batches})")
    need(cfg.model.logprob_chunk >= 1, f"model.logprob_chunk must be >= 1, got {cfg.model.logprob_chunk}")
    need(cfg.model.attention_block >= 0, f"model.attention_block must be >= 0, got {cfg.model.attention_block}")
    need(cfg.reward.overlong_buffer_len < r.max_response_length,
         f"reward.overlong_buffer_len ({cfg.reward.overlong_buffer_len}) must be < rollout.max_response_length ({r.max_response_length})")
    for name in ("data", "fsdp", "tensor"):
        v = getattr(cfg.mesh, name)
        need(v == -1 or v >= 1, f"mesh.{name} must be -1 (fill) or >= 1, got {v}")
    need([cfg.mesh.data, cfg.mesh.fsdp, cfg.mesh.tensor].count(-1) <= 1, "at most one of mesh.data/fsdp/tensor may be -1")
    need(cfg.tool.max_output_chars >= 16, f"tool.max_output_chars must be >= 16, got {cfg.tool.max_output_chars}")
    need(cfg.tool.max_parallel_calls >= 1, f"tool.max_parallel_calls must be >= 1, got {cfg.tool.max_parallel_calls}")
    for name in ("truncate_head", "truncate_tail"):
        v = getattr(cfg.tool, name)
        need(v is None or v >= 0, f"tool.{name} must be null or >= 0, got {v}")
    need(cfg.sandbox.memory_limit_mb >= 1, f"sandbox.memory_limit_mb must be >= 1, got {cfg.sandbox.memory_limit_mb}")
    need(cfg.eval.max_prompt_length >= 1, f"eval.max_prompt_length must be >= 1, got {cfg.eval.max_prompt_length}")
    need(cfg.sandbox.run_timeout > 0, f"sandbox.run_timeout must be > 0, got {cfg.sandbox.run_timeout}")
    need(t.micro_batch_size >= 0, f"train.micro_batch_size must be >= 0 (0: no split), got {t.micro_batch_size}")
    rows = t.prompts_per_step * r.n // max(t.mini_batches, 1)
    need(t.micro_batch_size == 0 or rows % t.micro_batch_size == 0,
         f"train.micro_batch_size ({t.micro_batch_size}) must divide the trajectories per mini-batch "
         f"(train.prompts_per_step * rollout.n / train.mini_batches = {rows})")
    need(t.epochs >= 1, f"train.epochs must be >= 1, got {t.epochs}")
    need(cfg.teacher.logprob_chunk >= 1, f"teacher.logprob_chunk must be >= 1, got {cfg.teacher.logprob_chunk}")
    need(cfg.teacher.attention_block >= 0, f"teacher.attention_block must be >= 0, got {cfg.teacher.attention_block}")
    d = cfg.distributed
    need(d.num_processes is None or d.num_processes >= 1,
         f"distributed.num_processes must be >= 1, got {d.num_processes}")
    need(d.process_id is None or (d.process_id >= 0 and (d.num_processes is None or d.process_id < d.num_processes)),
         f"distributed.process_id must be in [0, distributed.num_processes), got {d.process_id}")
    need(not (d.num_processes and d.num_processes > 1 and d.process_id is not None and not d.coordinator),
         "distributed.num_processes > 1 with an explicit process_id needs distributed.coordinator (host:port of process 0)")
    for k in ("initialization_timeout", "heartbeat_timeout", "shutdown_timeout"):
        need(getattr(d, k) >= 1, f"distributed.{k} must be >= 1 second, got {getattr(d, k)}")
    for sec, (_, sec_tp) in _fields(Config).items():
        for name, (f, _tp) in _fields(sec_tp).items():
            if not f.metadata.get("implemented", True):
                default = f.default if f.default is not dataclasses.MISSING else f.default_factory()
                need(getattr(getattr(cfg, sec), name) == default,
                     f"{sec}.{name} is not implemented yet; remove it or leave it at its default {default!r}")
    need(cfg.checkpoint.save_every >= 1, f"checkpoint.save_every must be >= 1, got {cfg.checkpoint.save_every}")
    need(cfg.checkpoint.keep >= 1, f"checkpoint.keep must be >= 1, got {cfg.checkpoint.keep}")
    need(cfg.reward.timeout > 0, f"reward.timeout must be > 0, got {cfg.reward.timeout}")
    need(cfg.reward.case_timeout > 0, f"reward.case_timeout must be > 0, got {cfg.reward.case_timeout}")
    for src, scorer in cfg.reward.sources.items():
        need(scorer in ("math", "choice", "code"),
             f"reward.sources maps {src!r} to {scorer!r}; scorers are math, choice, code")
    if problems:
        raise ConfigError(f"invalid config ({source}):\n  - " + "\n  - ".join(problems))


def reference_markdown() -> str:
    """The config reference (one table per section) for docs/config.md."""
    lines = []
    for sec, (_, sec_tp) in _fields(Config).items():
        lines.append(f"**`{sec}`**: {' '.join(sec_tp.__doc__.split())}\n")
        lines.append("| key | type | default | meaning |\n|---|---|---|---|")
        for name, (f, tp) in _fields(sec_tp).items():
            default = f.default if f.default is not dataclasses.MISSING else f.default_factory()
            if dataclasses.is_dataclass(default):
                default = dataclasses.asdict(default)
            note = "" if f.metadata.get("implemented", True) else " (not implemented yet: only the default is accepted)"
            lines.append(f"| `{sec}.{name}` | {_type_name(tp)} | `{json.dumps(default)}` | {f.metadata['help']}{note} |")
        lines.append("")
    return "\n".join(lines)


def add_config_args(parser) -> None:
    """Standard ``--config FILE [key=value ...] [--print-config]`` arguments for a CLI."""
    parser.add_argument("--config", action="append", default=[], metavar="FILE",
                        help="YAML config file (repeatable; later files override earlier ones).")
    parser.add_argument("overrides", nargs="*", metavar="section.key=value",
                        help="Dotted overrides applied after the files, e.g. algo.delta=0.5 mesh.fsdp=4.")
    parser.add_argument("--print-config", action="store_true", help="Print the resolved config as YAML and exit.")


def add_plan_arg(parser) -> None:
    """``--plan TARGET``: shorthand for the ``compile.plan=TARGET`` override (train / sft)."""
    parser.add_argument("--plan", metavar="TARGET", default=None,
                        help="Before any weights load, compile the run's programs for TARGET (v5e-8, v4-32, "
                             "v5e:2x4, 8xH100, cpu:N) and stop with the knob to turn if they do not fit "
                             "(compile.plan; see python -m sod_jax.plan).")


def config_from_args(args, job: str = "train") -> Config:
    """Resolve a Config from parsed :func:`add_config_args` arguments; exits with the message on error."""
    overrides = list(args.overrides)
    if getattr(args, "plan", None):
        overrides.append(f"compile.plan={args.plan}")
    try:
        cfg = load_config(args.config, overrides, job=job)
    except ConfigError as e:
        print(f"error: {e}", file=sys.stderr)
        raise SystemExit(2) from None
    if args.print_config:
        print(cfg.to_yaml(), end="")
        raise SystemExit(0)
    return cfg


def main(argv: Optional[list[str]] = None) -> None:
    parser = argparse.ArgumentParser(
        prog="python -m sod_jax.config",
        description="Resolve and print a sod_jax config, or print the reference of every key.")
    add_config_args(parser)
    parser.add_argument("--reference", action="store_true", help="Print the markdown reference of every key.")
    args = parser.parse_args(argv)
    if args.reference:
        print(reference_markdown())
        return
    args.print_config = True
    config_from_args(args)


if __name__ == "__main__":
    main()
