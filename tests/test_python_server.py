"""helpers.run_python, which most script tests run through, against a real interpreter: the same stdout, stderr and
exit status, fresh random seeds in every run, and the timeout of subprocess.run."""
import os
import signal
import subprocess
import sys
import time

import pytest

from conftest import python_env
from gpfq.paths import REPO_ROOT
from helpers import ForkedProcess, run_python

SCRIPT = str(REPO_ROOT / "quantization_scripts" / "quantize.py")
CASES = {  # what a user meets: a bad option, a known error, a crash, exit with a message, a clean exit
    "bad option": [SCRIPT, "--bitz", "4"],
    "bad value": [SCRIPT, "--bits", "0", "--log_dir", "{tmp}/logs", "--model_dir", "{tmp}/models"],
    "crash": ["-c", "import sys; print(sys.argv[1:], 'out'); print('err', file=sys.stderr); [].pop()", "a", "b"],
    "exit text": ["-c", "import sys; sys.exit('bye')"],
    "exit 3": ["-c", "import atexit, sys; atexit.register(print, 'at exit'); sys.exit(3)"],
    "script crash": ["{tmp}/boom.py", "x"],  # a script's own frames, from its first line
}


@pytest.mark.parametrize("case", CASES)
def test_a_forked_run_is_what_a_real_interpreter_gives(case, tmp_path):
    (tmp_path / "boom.py").write_text("import sys\n\ndef f(x):\n    return {}[x]\n\nf(sys.argv[1])\n")
    command = [sys.executable] + [arg.replace("{tmp}", str(tmp_path)) for arg in CASES[case]]
    real = subprocess.run(command, cwd=tmp_path, env=python_env(), capture_output=True, text=True, timeout=300)
    forked = run_python(command, cwd=tmp_path, env=python_env(), capture_output=True, text=True, timeout=300)
    assert (forked.returncode, forked.stdout, forked.stderr) == (real.returncode, real.stdout, real.stderr)
    assert real.returncode != 0 and real.stdout + real.stderr  # each case says something and fails


def test_each_run_draws_fresh_random_seeds():
    code = "import random, numpy, torch; print(torch.initial_seed(), random.random(), numpy.random.random())"
    first, second = [run_python([sys.executable, "-c", code], env=python_env()).stdout.split() for _ in range(2)]
    assert len(first) == 3 and all(a != b for a, b in zip(first, second)), (first, second)


def test_a_run_past_its_timeout_is_killed():
    with pytest.raises(subprocess.TimeoutExpired):
        run_python([sys.executable, "-c", "import time; time.sleep(60)"], env=python_env(), timeout=1)
    assert run_python([sys.executable, "-c", "print(1)"], env=python_env()).stdout == "1\n"  # the server goes on


def test_a_run_takes_the_thread_count_of_its_environment():
    code = "import torch; print(torch.get_num_threads())"
    for threads in [str(n) for n in range(1, min(os.cpu_count() or 1, 2) + 1)]:  # torch caps it at the cores
        env = dict(python_env(), OMP_NUM_THREADS=threads)
        real = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=300)
        assert run_python([sys.executable, "-c", code], env=env).stdout == real.stdout == f"{threads}\n"


def test_runs_at_once_end_apart_and_take_signals_as_processes_do():
    """Two runs at the same time, each with its own output and status; SIGTERM to one gives -15, as Popen's does."""
    sleeper = ForkedProcess([sys.executable, "-c", "import time; print('up', flush=True); time.sleep(60)"],
                            env=python_env())
    quick = ForkedProcess([sys.executable, "-c", "import sys; print('quick'); sys.exit(4)"], env=python_env())
    assert quick.communicate(timeout=60) == ("quick\n", "") and quick.returncode == 4
    assert sleeper.poll() is None
    sleeper.send_signal(15)
    assert sleeper.communicate(timeout=60) == ("up\n", "") and sleeper.returncode == -15


@pytest.mark.parametrize("handled", [True, False])
def test_ctrl_c_ends_a_run_as_it_ends_a_process(handled, tmp_path):
    """SIGINT to a run that waits: exit 130 where the script turns KeyboardInterrupt into it, else -2 with the
    traceback, as a new interpreter started with SIGINT at its default gives."""
    wait = "print('up', flush=True)\ntime.sleep(60)\n"  # 'up': the handler is in place
    body = "import sys, time\n" + ("try:\n    " + wait.replace("\n", "\n    ").rstrip(" ")
                                    + "except KeyboardInterrupt:\n    sys.exit(130)\n" if handled else wait)
    (tmp_path / "wait.py").write_text(body)
    command = [sys.executable, str(tmp_path / "wait.py")]
    real = subprocess.Popen(command, env=python_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    forked = ForkedProcess(command, env=python_env(), interrupt=True)
    assert real.stdout.readline() == "up\n"
    while forked.poll() is None and "up" not in forked._out.read_text():
        time.sleep(0.01)
    for process in (real, forked):
        process.send_signal(signal.SIGINT)
    (real_out, real_err), (out, err) = real.communicate(timeout=60), forked.communicate(timeout=60)
    assert forked.returncode == real.returncode == (130 if handled else -signal.SIGINT)
    assert out == "up\n" and real_out == "" and err.splitlines()[-1:] == real_err.splitlines()[-1:]
