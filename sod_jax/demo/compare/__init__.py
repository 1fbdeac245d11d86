"""``python -m sod_jax.demo compare``: SOD vs OPD vs GRPO from the demo student, decided by a rule
written down before the runs.

Three steps, each reading and writing files only, so the comparison resumes across working
sessions and every figure can be rebuilt from the run directories:

1. ``compare run --seeds 0,1,2 --arms sod,opd,grpo --out PILOT``: the pilot (no rule yet).
2. ``compare plan --pilot-dir PILOT --min-effect 0.04 --out DIR``: writes ``DIR/rule.json`` and
   ``DIR/rule.md`` before any main run: the minimum effect of interest, the pilot's paired
   standard deviations of the SOD - OPD and SOD - GRPO final held-out accuracy, the number of
   paired seeds (:func:`sod_jax.demo.stats.seeds_needed`, the larger of the two, at least 6), the
   statistic, the fixed seed list (by default the seeds after the pilot's, so the pilot that chose
   the sample size is not part of the test), the run settings and the control OPD coefficient.
   An existing ``rule.json`` is never replaced without ``--force``.
3. ``compare run --rule DIR/rule.json --out DIR``: every arm x every rule seed, then
   ``compare table --out DIR``: the table, ``compare.json`` and the plot.

The arms. Each (arm, seed) is one ordinary ``python -m sod_jax.train --config CONFIG [overrides]
algo.name=... train.seed=S data.seed=S train.out_dir=DIR/<arm>/seed<S>`` run (same data order and
initial student per seed in every arm):

* ``grpo``: ``algo.name=grpo`` (outcome reward only, no teacher);
* ``opd``: ``algo.name=opd``. In this code base OPD *is* SOD with every ``w_k = 1``: the per-token
  advantage of ``opd`` is ``A m + c (q - s) m`` and that of ``sod`` is ``A m + c w (q - s) m``
  (:func:`sod_jax.algo.advantages.token_advantages`; the modes differ only in ``weights="step"``
  in :data:`sod_jax.algo.modes.TABLE`), with the same ``c = algo.opd_coef`` (1 in the demo config);
* ``sod``: ``algo.name=sod``;
* ``opd_control``: ``algo.name=opd algo.opd_coef=c0`` with ``c0`` the mean SOD step weight of the
  pilot's SOD runs (:func:`mean_step_weight`): OPD with the same average distillation strength as
  SOD, so a SOD gain that is only a smaller overall distillation weight shows up as no SOD -
  opd_control difference.

After training, the final student is exported (``python -m sod_jax.convert orbax-to-hf --ckpt
RUN/checkpoints --step TOTAL --out RUN/model``; the RL loop writes orbax checkpoints only) and
evaluated once on the held-out parquet (``python -m sod_jax.eval``, >= 256 prompts, ``eval.n``
samples each) into ``RUN/final_eval`` (``generations.jsonl``, ``summary.json``), with
``eval.seed`` = the run's seed, so every arm of a seed gets the same evaluation draws. Each phase
is skipped when its output is complete (:func:`train_complete`, :func:`export_complete`,
:func:`eval_complete`); the train and eval CLIs resume a half-done phase themselves.
``RUN/compare_run.json`` records the commands.

Everything reported is read back from the run directories (DESIGN §5):

* final held-out accuracy: per prompt the mean of its samples' ``acc`` in
  ``final_eval/generations.jsonl``, then the mean over prompts (avg@n);
* the paired differences SOD - OPD, SOD - GRPO (the two pre-registered comparisons) and SOD -
  opd_control, per seed, with the paired t 95% interval, the hierarchical bootstrap 95% interval
  (seeds, then prompts within seeds) and the sign count (:mod:`sod_jax.demo.stats`);
* the recovery rate after an error per arm: over the final-eval samples whose trajectory had a
  failed check, the fraction that later produced the failed step's true value
  (``error_recovery(prompt_text, tool_outputs)`` of the sample's task, :func:`recovery_function`:
  ``sod_jax.demo.task`` for demo_chain, ``sod_jax.demo.check_task`` for demo_check; the prompt text
  comes from the held-out parquet by ``prompt_id``, the tool outputs of each turn from the sample's
  response text, :func:`response_tool_outputs`);
* from the periodic evaluations of the RL loop (``eval.jsonl``): held-out accuracy before and
  after, the accuracy-vs-step plot, the final student-teacher KL (``heldout_kl``; GRPO loads no
  teacher, so it has none);
* from ``step_weights.jsonl`` (a bounded sample of trajectories per step: ``d`` and ``w`` per turn,
  the prompt and the tool outputs): the mean ``d_1`` over training, and the mean step weight
  ``w_k`` (turns 2 and later; ``w_1`` is 1 by definition) at the tool step where a trajectory
  first went wrong, at correct tool steps, and at the turns after the wrong step (a demo_chain
  tool step is wrong when its output is not the step's true value, :func:`step_failures`).

``compare table`` writes ``compare.md`` (the rule, copied from ``rule.md``, next to the tables),
``compare.json``, ``compare_acc.png`` (held-out accuracy against step, mean with a ±1 std band
per arm) and ``compare_weights.png`` (``d_1`` per RL step of every arm with a teacher, and SOD's
mean ``w_k`` at correct tool steps) into ``--out``.

The modules: :mod:`sod_jax.demo.compare.runs` (reading one run directory, and training, exporting
and evaluating the arms x seeds), :mod:`sod_jax.demo.compare.rule` (``compare plan``: the rule),
:mod:`sod_jax.demo.compare.report` (``compare table``: the tables, ``compare.json`` and the plot) and
:mod:`sod_jax.demo.compare.cli` (the ``compare`` subcommands). Their public names are importable
from here; a test that replaces a function does so in the module that calls it (e.g.
``sod_jax.demo.compare.runs._call``).
"""

from sod_jax.demo.compare.cli import cmd_plan, cmd_run, cmd_table, run_compare
from sod_jax.demo.compare.report import (
    build_report,
    collect,
    paired_comparison,
    plot,
    plot_weights,
    table,
    verdict,
    write_report,
)
from sod_jax.demo.compare.rule import (
    COMPARISONS,
    LEVEL,
    MIN_HELDOUT_PROMPTS,
    PRIMARY,
    RULE_JSON,
    RULE_MD,
    make_rule,
    pilot_figures,
    rule_markdown,
    write_rule,
)
from sod_jax.demo.compare.runs import (
    ARMS,
    DEFAULT_CONFIG,
    DEFAULT_HELDOUT,
    EVAL_DIR,
    EXPORT_DIR,
    EXPORT_MARK,
    PILOT_ARMS,
    RECOVERY_MODULES,
    RUN_RECORD,
    arm_overrides,
    eval_acc,
    eval_cmd,
    eval_complete,
    eval_ks,
    export_cmd,
    export_complete,
    final_accuracy,
    final_eval,
    heldout_prompts,
    mean_step_weight,
    read_eval,
    recovery_function,
    resolve_path,
    response_tool_outputs,
    run_arms,
    run_one,
    run_path,
    run_summary,
    step_failures,
    train_cmd,
    train_complete,
)

__all__ = [
    # runs
    "ARMS", "PILOT_ARMS", "DEFAULT_CONFIG", "DEFAULT_HELDOUT", "EXPORT_DIR", "EVAL_DIR", "EXPORT_MARK", "RUN_RECORD",
    "RECOVERY_MODULES", "eval_acc", "step_failures", "run_summary", "mean_step_weight", "response_tool_outputs",
    "heldout_prompts", "recovery_function", "read_eval", "final_eval", "final_accuracy", "run_path",
    "train_complete", "export_complete", "eval_complete", "arm_overrides", "train_cmd", "export_cmd", "eval_ks",
    "eval_cmd", "resolve_path", "run_one", "run_arms",
    # rule
    "PRIMARY", "COMPARISONS", "MIN_HELDOUT_PROMPTS", "RULE_JSON", "RULE_MD", "LEVEL", "pilot_figures", "make_rule",
    "rule_markdown", "write_rule",
    # report
    "table", "plot", "plot_weights", "verdict", "paired_comparison", "collect", "build_report", "write_report",
    # cli
    "cmd_plan", "cmd_run", "cmd_table", "run_compare",
]
