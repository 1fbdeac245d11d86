"""House rules that keep the code base readable: the import graph (no cycle, no library module
importing a CLI, no import of another module's ``_private`` name), every documented command's
``--help``, and the README as a front door whose relative links all resolve."""

import json
import re
import subprocess
import sys
from pathlib import Path

import pytest
from support.import_graph import import_problems

REPO = Path(__file__).resolve().parents[1]

# Every ``python -m`` command the README documents, as a user types it.
COMMANDS = [["train"], ["sft"], ["eval"], ["generate"], ["convert"], ["convert", "orbax-to-hf"],
            ["convert", "hf-to-orbax"], ["config"], ["tracking"], ["tracking", "plot"], ["sandbox"],
            ["sandbox", "serve"], ["demo"], ["bench"], ["bench", "rollout"], ["bench", "sandbox"],
            ["bench", "train-step"], ["bench", "sod-weights"], ["bench", "memory"], ["bench", "rl-step"], ["plan"]]

HELP_RUNNER = """
import contextlib, io, json, runpy, sys
out = {}
for cmd in json.loads(sys.argv[1]):
    sys.argv = ["sod_jax." + cmd[0], *cmd[1:], "--help"]
    buf = io.StringIO()
    code = None
    with contextlib.redirect_stdout(buf), contextlib.redirect_stderr(buf):
        try:
            runpy.run_module("sod_jax." + cmd[0], run_name="__main__", alter_sys=True)
        except SystemExit as e:
            code = e.code
        except BaseException as e:
            code = repr(e)
    out[" ".join(cmd)] = [code, buf.getvalue()]
print(json.dumps(out))
"""


def test_import_rules_hold_for_the_package():
    problems = import_problems(REPO / "sod_jax", "sod_jax")
    assert not problems, "\n".join(problems)


def test_import_rules_catch_each_kind_of_break(tmp_path):
    pkg = tmp_path / "pkg"
    (pkg / "rollout").mkdir(parents=True)
    (pkg / "__init__.py").write_text("")
    (pkg / "rollout" / "__init__.py").write_text("")
    (pkg / "rollout" / "engine.py").write_text("def f():\n    from pkg.rollout.scheduler import S  # deferred\n")
    (pkg / "rollout" / "scheduler.py").write_text("from pkg.rollout.engine import f\nS = 1\n")
    (pkg / "eval.py").write_text("def make(): pass\n")
    (pkg / "lib.py").write_text("from pkg.eval import make\nfrom pkg.rollout.engine import _hidden\n")
    (pkg / "train.py").write_text("from .lib import make\nfrom pkg import eval\n")  # a CLI may use anything
    problems = import_problems(pkg, "pkg")
    assert len(problems) == 3, problems
    assert any("import cycle" in p and "pkg.rollout.engine" in p and "pkg.rollout.scheduler" in p for p in problems)
    assert any("library module pkg.lib imports the CLI module pkg.eval" in p for p in problems)
    assert any("private name pkg.rollout.engine._hidden" in p for p in problems)


@pytest.mark.slow
def test_every_documented_command_explains_itself():
    """One child process runs each command's ``--help`` the way ``python -m`` does."""
    p = subprocess.run([sys.executable, "-c", HELP_RUNNER, json.dumps(COMMANDS)], cwd=REPO, capture_output=True,
                       text=True, timeout=300, env={**__import__("os").environ, "JAX_PLATFORMS": "cpu"})
    assert p.returncode == 0, p.stderr[-3000:]
    results = json.loads(p.stdout.strip().splitlines()[-1])
    for cmd, (code, text) in results.items():
        assert code in (0, None), f"python -m sod_jax.{cmd} --help: exit {code}\n{text[-2000:]}"
        assert "usage:" in text.lower(), f"python -m sod_jax.{cmd} --help printed no usage:\n{text[-2000:]}"
    readme = (REPO / "README.md").read_text() + "".join(p.read_text() for p in (REPO / "docs").glob("*.md"))
    documented = set(re.findall(r"python -m sod_jax\.(\w+)", readme))
    assert documented <= {c[0] for c in COMMANDS}, f"commands documented but not checked: {documented}"


def _slug(heading: str) -> str:
    """GitHub's anchor for a markdown heading."""
    text = re.sub(r"[`*]|\[([^\]]*)\]\([^)]*\)", lambda m: m.group(1) or "", heading.strip().lower())
    return re.sub(r"[^\w\- ]", "", text).replace(" ", "-")


def _anchors(md: Path) -> set[str]:
    text = re.sub(r"```.*?```", "", md.read_text(), flags=re.S)
    return {_slug(m) for m in re.findall(r"^#{1,6}\s+(.*)$", text, flags=re.M)}


def broken_links(md: Path) -> list[str]:
    text = re.sub(r"```.*?```", "", md.read_text(), flags=re.S)
    out = []
    for target in re.findall(r"\]\(([^)\s]+)\)", text):
        if re.match(r"[a-z]+:", target):
            continue  # http(s), mailto: not checked offline
        path, _, anchor = target.partition("#")
        dest = (md.parent / path).resolve() if path else md
        if not dest.exists():
            out.append(f"{md.relative_to(REPO)}: {target} (no such file)")
        elif anchor and dest.suffix == ".md" and anchor not in _anchors(dest):
            out.append(f"{md.relative_to(REPO)}: {target} (no such heading)")
    return out


def test_readme_is_a_front_door_linking_every_docs_page():
    readme = REPO / "README.md"
    assert len(readme.read_text().splitlines()) <= 320
    pages = sorted((REPO / "docs").glob("*.md"))
    assert pages
    linked = {(readme.parent / t.partition("#")[0]).resolve() for t in re.findall(r"\]\(([^)#\s]+)", readme.read_text())}
    assert not [p.name for p in pages if p.resolve() not in linked], "docs pages the README does not link"


def test_no_broken_relative_link():
    files = [REPO / "README.md", REPO / "launch" / "README.md", *sorted((REPO / "docs").glob("*.md"))]
    problems = [b for f in files if f.exists() for b in broken_links(f)]
    assert not problems, "\n".join(problems)


def test_link_checker_finds_breaks(tmp_path, monkeypatch):
    monkeypatch.setattr(sys.modules[__name__], "REPO", tmp_path)
    (tmp_path / "a.md").write_text("# Top\n## The RL loop: `python -m x`\n[ok](#top) [ok2](#the-rl-loop-python--m-x) "
                                   "[bad](#nope) [gone](b.md) [web](https://x.y/z)\n")
    assert broken_links(tmp_path / "a.md") == ["a.md: #nope (no such heading)", "a.md: b.md (no such file)"]
