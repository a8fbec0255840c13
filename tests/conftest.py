import json
import os
import signal
import subprocess
import sys
import time

# Tiny models on 2 shared cores: intra-op threads only add contention (measured 7x slower).
os.environ.setdefault("OMP_NUM_THREADS", "1")

import pytest
import torch

torch.set_num_threads(1)


@pytest.fixture(scope="session")
def digits():
    from robench.data import load_dataset

    return load_dataset("digits")


@pytest.fixture(scope="session")
def trained_workdir(tmp_path_factory, digits):
    """A workdir with a briefly trained tiny standard model and a tiny pgdat model on digits.
    Shared by the whole session, so tests only read it; a test that writes results uses
    ``runs_copy``."""
    from robench.training import TrainConfig, train

    workdir = tmp_path_factory.mktemp("workdir")
    for defense, steps, options in (("standard", 150, {}), ("pgdat", 150, {"attack_steps": 3})):
        cfg = TrainConfig(defense, "digits", arch="tiny-cnn", steps=steps, options=options)
        train(cfg, workdir, splits=digits, progress=False, checkpoint_every=steps, log_every=50)
    return workdir


@pytest.fixture
def runs_copy(trained_workdir, tmp_path):
    """A private workdir holding a copy of ``trained_workdir``'s runs and no results."""
    import shutil

    workdir = tmp_path / "workdir"
    shutil.copytree(trained_workdir / "runs", workdir / "runs")
    return workdir


# The processes under test are ``python -m robench ARGS`` forked from one "zygote" interpreter
# that has already imported torch, robench and scikit-learn: each is a separate OS process that
# runs robench/__main__.py as ``-m`` does (runpy) and dies by a real SIGKILL, but none pays the
# seconds of imports again (on two busy cores, eleven fresh interpreters cost over a minute).
# tests/test_cli_errors.py runs the real ``python -m robench`` entry point.
ZYGOTE = r"""
import json, os, runpy, sys, traceback
import robench.cli, robench.training, robench.evaluation, sklearn.datasets, sklearn.model_selection, torch._dynamo
import robench.attacks, robench.defenses, robench.models
while True:
    cmd, _, arg = sys.stdin.readline().strip().partition(" ")
    if cmd == "run":
        req = json.loads(arg)
        sys.stdout.flush()
        pid = os.fork()
        if pid == 0:
            code = 1
            try:
                os.chdir(req["cwd"])
                for fd, path in ((1, req["stdout"]), (2, req["stderr"])):
                    f = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
                    os.dup2(f, fd)
                    os.close(f)
                f = os.open(os.devnull, os.O_RDONLY)
                os.dup2(f, 0)
                os.close(f)
                sys.argv = ["robench", *req["args"]]
                try:
                    runpy.run_module("robench", run_name="__main__", alter_sys=True)
                    code = 0
                except SystemExit as e:
                    code = e.code if isinstance(e.code, int) else int(e.code is not None)
            except BaseException:
                traceback.print_exc()
            finally:
                sys.stdout.flush()
                sys.stderr.flush()
                os._exit(code)
        print("pid", pid, flush=True)
    elif cmd == "wait":
        print("exit", os.waitstatus_to_exitcode(os.waitpid(int(arg), 0)[1]), flush=True)
    else:
        break
"""


class Child:
    def __init__(self, pid, out, err):
        self.pid, self.out, self.err = pid, out, err

    def alive(self):
        try:
            with open(f"/proc/{self.pid}/stat") as f:
                return f.read().rsplit(")", 1)[1].split()[0] != "Z"
        except FileNotFoundError:
            return False

    def output(self):
        return self.out.read_text() + self.err.read_text()


class Zygote:
    def __init__(self, logdir):
        self.logdir, self.n = logdir, 0
        env = {**os.environ, "OMP_NUM_THREADS": "1"}
        self.proc = subprocess.Popen([sys.executable, "-c", ZYGOTE], env=env, stdin=subprocess.PIPE,
                                     stdout=subprocess.PIPE, stderr=open(logdir / "zygote.err", "w"), text=True)

    def _ask(self, line):
        self.proc.stdin.write(line + "\n")
        self.proc.stdin.flush()
        answer = self.proc.stdout.readline().split()
        assert answer, f"zygote died: {(self.logdir / 'zygote.err').read_text()}"
        return int(answer[1])

    def run(self, args, cwd):
        """Start ``python -m robench ARGS`` in ``cwd``."""
        self.n += 1
        out, err = self.logdir / f"{self.n}.out", self.logdir / f"{self.n}.err"
        pid = self._ask("run " + json.dumps({"args": [str(a) for a in args], "cwd": str(cwd),
                                              "stdout": str(out), "stderr": str(err)}))
        return Child(pid, out, err)

    def wait(self, child, timeout=300.0):
        """The child's exit code (negative: killed by that signal)."""
        deadline = time.monotonic() + timeout
        while child.alive():
            if time.monotonic() > deadline:
                os.kill(child.pid, signal.SIGKILL)
                pytest.fail(f"robench {child.pid} timed out: {child.output()}")
            time.sleep(0.01)
        return self._ask(f"wait {child.pid}")

    def close(self):
        self.proc.stdin.close()
        self.proc.wait(timeout=30)


@pytest.fixture(scope="session")
def zygote(tmp_path_factory):
    z = Zygote(tmp_path_factory.mktemp("zygote"))
    yield z
    z.close()
