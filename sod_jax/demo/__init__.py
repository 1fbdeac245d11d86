"""The CPU demo: a synthetic multi-step tool task (:mod:`sod_jax.demo.task`), its small tokenizer
(:mod:`sod_jax.demo.tokenizer`), the shipped tiny teacher and student (``assets/``: SFT stopped by held-out tool-using accuracy, the
recipe of ``configs/demo_teacher_sft.yaml``) and the SOD / OPD / GRPO comparison
(:mod:`sod_jax.demo.compare`)."""

from pathlib import Path

ASSETS = Path(__file__).resolve().parent / "assets"
DATA_DIR = ASSETS / "data"
TOKENIZER_DIR = ASSETS / "tokenizer"
TEACHER_DIR = ASSETS / "teacher"
STUDENT_DIR = ASSETS / "student"
