"""The sandbox behaves the same wherever the Python environment lives (the system prefix, a venv under
/tmp, a venv inside a checkout) and however the process that starts it was started (ignored or
blocked signals, a umask): warm, cold and through `sandbox serve` alike."""

import json
import os
import shutil
import signal
import site
import subprocess
import sys
import sysconfig
import tempfile
import venv
from pathlib import Path

import pytest

from sod_jax.sandbox import LocalSandbox, LocalSandboxConfig
from sod_jax.sandbox.local import exposed_paths, interpreter_paths

REPO = Path(__file__).resolve().parents[2]
CHILD = Path(__file__).with_name("sandbox_env_child.py")
MODES = ["warm", "cold", "serve"]


# -- which of the interpreter's places are bound back ---------------------------------------------------

def test_exposed_paths_binds_only_the_environment(tmp_path):
    tmp = str(tmp_path)
    checkout = tmp_path / "checkout"
    (checkout / ".venv" / "lib").mkdir(parents=True)
    (checkout / "secret.txt").write_text("x")
    home = tmp_path / "home"
    (home / "lib" / "python3" / "site-packages").mkdir(parents=True)
    hidden = [tmp, str(checkout), str(home)]
    binds = exposed_paths([str(checkout / ".venv"), str(checkout / ".venv" / "lib"), str(checkout)], hidden,
                          [*hidden, "/dev"])
    # the venv, not the checkout around it (which is hidden: the working directory); its lib comes with it
    assert binds == [(str(checkout / ".venv"), str(checkout / ".venv"))]
    # a prefix that is the home directory would show all of it: only its finer parts are bound
    binds = exposed_paths([str(home), str(home / "lib" / "python3" / "site-packages")], hidden, hidden)
    assert binds == [(str(home / "lib" / "python3" / "site-packages"),) * 2]
    # nothing outside the covered places needs binding (it is visible already)
    assert exposed_paths(["/usr/lib", "/usr"], hidden, hidden) == []


def test_exposed_paths_follow_symlinks_both_ways(tmp_path):
    real = tmp_path / "data" / "venv"
    real.mkdir(parents=True)
    link = tmp_path / "home" / "venv"
    link.parent.mkdir()
    link.symlink_to(real)
    hidden = [str(tmp_path / "home"), str(tmp_path / "data")]
    binds = exposed_paths([str(link)], hidden, hidden)
    assert sorted(binds) == sorted([(str(real), str(real)), (str(real), str(link))])


def test_interpreter_paths_leave_out_pth_additions(tmp_path):
    """What a .pth file adds from elsewhere (an editable install's source tree, a checkout) is not
    part of the environment the sandbox shows."""
    paths = interpreter_paths(sys.executable)
    assert os.path.normpath(sys.prefix) in paths and os.path.normpath(sys.base_prefix) in paths
    assert sysconfig.get_paths()["purelib"] in paths
    env = os.path.normpath(sys.prefix)  # (the environment may be the checkout's .venv: that one shows)
    assert not [p for p in paths if (p == str(REPO) or p.startswith(str(REPO) + "/"))
                and not (p == env or p.startswith(env + "/"))]


# -- venvs in the places users put them ----------------------------------------------------------------

LAZYPKG = {"__init__.py": "def f():\n    from lazypkg import sub  # imported only when called\n    return sub.VALUE\n",
           "sub.py": "VALUE = 41 + 1\n"}


def make_venv(where: Path, *, symlinked_copy: bool) -> tuple[Path, set[str]]:
    """A venv at ``where`` with a lazily importing package ``lazypkg`` in its own site-packages, and
    this test process's packages (numpy, sympy, aiohttp). ``symlinked_copy``: all of them symlinked
    into the venv's site-packages (so numpy and sympy are imported from under ``where``); otherwise
    it uses the system site-packages (and symlinks only what this process has besides, when it runs
    in a venv itself)."""
    venv.EnvBuilder(system_site_packages=not symlinked_copy, with_pip=False, symlinks=True).create(where)
    python = where / "bin" / "python"
    paths = json.loads(subprocess.run(
        [python, "-E", "-s", "-c", "import json, site, sys, sysconfig\n"
                                   "print(json.dumps([sysconfig.get_paths()['purelib'], sys.path]))"],
        capture_output=True, text=True, check=True).stdout)
    own_site, on_path = Path(paths[0]), {os.path.realpath(p) for p in paths[1]}
    targets = set()
    for host_site in site.getsitepackages():
        if os.path.isdir(host_site) and os.path.realpath(host_site) not in on_path:
            for entry in sorted(Path(host_site).iterdir()):
                if entry.name != "lazypkg" and not (own_site / entry.name).exists():
                    (own_site / entry.name).symlink_to(entry.resolve())
                    targets.add(str(entry.resolve().parent))
    (own_site / "lazypkg").mkdir()
    for name, text in LAZYPKG.items():
        (own_site / "lazypkg" / name).write_text(text)
    return python, targets


def skip_unless_visible(python: Path, targets: set[str], cwd: Path) -> None:
    """The symlinks point into this process's own environment: if that is a venv in a place the
    sandbox hides (a venv under /tmp running this suite), a venv made from it cannot show them, and
    the whole sandbox suite running from that venv is already this test's case."""
    sb = LocalSandbox(LocalSandboxConfig(mode="cold", workers=1, python=str(python)))
    hidden = sb._hidden() + [os.path.realpath(cwd)]
    binds = exposed_paths(interpreter_paths(str(python)), hidden, hidden)
    under = lambda p, top: p == top or p.startswith(top + "/")  # noqa: E731
    for t in map(os.path.realpath, targets):
        if any(under(t, h) for h in hidden) and not any(under(t, dest) for _, dest in binds):
            pytest.skip(f"this test process's own packages ({t}) are hidden from a venv made from it")


def snippet(venv_dir: Path, secret: Path) -> str:
    """Lazy imports from the venv, and what the code can do to the places around it."""
    return (f"import json, os, numpy, sympy\n"
            f"x = sympy.symbols('x')\n"
            f"factored = sympy.factor(x**2 - 1)\n"
            f"import lazypkg\n"
            f"print(lazypkg.f(), numpy.arange(4).sum(), factored)\n"
            f"report = {{}}\n"
            f"for name, path in (('venv', {str(venv_dir / 'pwned')!r}), ('package', lazypkg.__path__[0] + '/pwned')):\n"
            f"    try:\n"
            f"        open(path, 'w').write('pwned')\n"
            f"        report[name] = 'wrote'\n"
            f"    except OSError as e:\n"
            f"        report[name] = 'denied'\n"
            f"try:\n"
            f"    report['secret'] = open({str(secret)!r}).read()\n"
            f"except OSError:\n"
            f"    report['secret'] = 'unreadable'\n"
            f"report['around'] = sorted(os.listdir({str(venv_dir.parent)!r}))\n"
            f"print(json.dumps(report))\n")


def run_child(python, code, modes, *, cwd, preexec_fn=None):
    env = {"PATH": os.environ.get("PATH", "/usr/bin:/bin"), "PYTHONPATH": str(REPO), "LANG": "C.UTF-8",
           "HOME": os.environ.get("HOME", "/root")}
    if "SOD_JAX_SANDBOX_UID_BASE" in os.environ:
        env["SOD_JAX_SANDBOX_UID_BASE"] = os.environ["SOD_JAX_SANDBOX_UID_BASE"]
    r = subprocess.run([str(python), str(CHILD), json.dumps({"code": code, "modes": modes})], cwd=cwd, env=env,
                       capture_output=True, text=True, timeout=400, preexec_fn=preexec_fn)
    assert r.returncode == 0, r.stderr[-3000:]
    return json.loads(r.stdout.strip().splitlines()[-1])


@pytest.mark.slow
@pytest.mark.parametrize("where", ["venv under /tmp", "venv inside the checkout"])
def test_lazy_imports_from_a_venv(tmp_path, where):
    """numpy and sympy imported from a venv under /tmp (sympy's factor imports submodules lazily), and
    a package of the venv's own that the warm zygote never preloaded: warm, cold and served alike.
    The venv stays read-only and nothing else around it shows."""
    if where == "venv under /tmp":
        top = Path(tempfile.mkdtemp(prefix="sod_venv_", dir="/tmp"))
        venv_dir, cwd = top / "venv", tmp_path
        python, targets = make_venv(venv_dir, symlinked_copy=True)
    else:  # the trainer runs in the checkout, as the README does: the checkout is hidden, not its .venv
        top = cwd = tmp_path / "checkout"
        (cwd / "sod_jax").mkdir(parents=True)
        venv_dir = cwd / ".venv"
        python, targets = make_venv(venv_dir, symlinked_copy=False)
    try:
        skip_unless_visible(python, targets, cwd)
        check_lazy_imports(python, venv_dir, cwd)
    finally:
        shutil.rmtree(top, ignore_errors=True)


def check_lazy_imports(python, venv_dir, cwd):
    secret = venv_dir.parent / "secret.txt"
    secret.write_text("canary-secret")
    before = sorted(p.name for p in venv_dir.parent.iterdir())
    out = run_child(python, snippet(venv_dir, secret), MODES, cwd=cwd)
    for mode in MODES:
        r = out[mode]
        assert r["status"] == "Success", (mode, r)
        lines = r["stdout"].splitlines()
        assert lines[0] == "42 6 (x - 1)*(x + 1)", (mode, r)
        report = json.loads(lines[1])
        assert report["venv"] == report["package"] == "denied", (mode, report)
        assert report["secret"] == "unreadable", (mode, report)
        assert report["around"] == [venv_dir.name], (mode, report)  # the venv only, not its neighbours
    assert sorted(p.name for p in venv_dir.parent.iterdir()) == before
    assert not (venv_dir / "pwned").exists() and secret.read_text() == "canary-secret"


# -- signals, signal mask and umask of the starting process --------------------------------------------

SIGNAL_REPORT = ("import json, os, signal\n"
                 "lines = open('/proc/self/status').read().splitlines()\n"
                 "status = dict(line.split(':\\t') for line in lines if ':\\t' in line)\n"
                 "print(json.dumps({'int': signal.getsignal(signal.SIGINT) is signal.default_int_handler,\n"
                 "                  'term': signal.getsignal(signal.SIGTERM) is signal.SIG_DFL,\n"
                 "                  'quit': signal.getsignal(signal.SIGQUIT) is signal.SIG_DFL,\n"
                 "                  'hup': signal.getsignal(signal.SIGHUP) is signal.SIG_DFL,\n"
                 "                  'ignored': int(status['SigIgn'], 16), 'blocked': int(status['SigBlk'], 16),\n"
                 "                  'umask': os.umask(0)}))\n")


def hostile_start():
    """What nohup, a non-interactive shell's `&` or a batch launcher may leave a trainer with."""
    for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGQUIT, signal.SIGHUP):
        signal.signal(sig, signal.SIG_IGN)
    signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGUSR1, signal.SIGUSR2})
    os.umask(0o077)


@pytest.mark.slow
def test_executions_start_with_default_signals_whatever_the_parent_had(tmp_path):
    out = run_child(sys.executable, SIGNAL_REPORT, ["warm", "cold", "cold-fallback", "serve"], cwd=tmp_path,
                    preexec_fn=hostile_start)
    python_ignores = (1 << (signal.SIGPIPE - 1)) | (1 << (signal.SIGXFSZ - 1))  # what the interpreter itself ignores
    expected = {"int": True, "term": True, "quit": True, "hup": True, "ignored": python_ignores, "blocked": 0,
                "umask": 0o022}
    for mode, r in out.items():
        assert r["status"] == "Success", (mode, r)
        assert json.loads(r["stdout"]) == expected, (mode, r["stdout"])


@pytest.mark.slow
def test_sandbox_tests_do_not_need_job_control():
    """A test run started in the background of a non-interactive shell (SIGINT and SIGQUIT ignored)
    sees the executions as any other run does."""
    test = "tests/sandbox/test_warm.py::test_state_does_not_leak_into_the_next_execution"
    r = subprocess.run(["bash", "-c", f'"$0" -m pytest -q -p no:cacheprovider "{test}" & wait $!', sys.executable],
                       cwd=REPO, capture_output=True, text=True, timeout=300, preexec_fn=hostile_start)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-2000:]
