"""`python SCRIPT ARGS…` for the tests, without paying for `import torch` each time.

A user meets bad input as a fresh `python quantize.py …` process, and the tests run it that way: the whole of stdout
and stderr, and the exit status. Such a process spends about 3 CPU-seconds importing torch, torchvision and gpfq
before it reads its first argument; some eighty of them made a fifth of the suite's time. Here one server process
per test worker imports those once, and forks a child for each run. The child is a new process as the script
would see it: its own working directory, environment, argv, sys.path, stdin (/dev/null), stdout and stderr (files),
warning filters and atexit handlers, and its exit status as the interpreter would give it (an uncaught exception is
printed by sys.excepthook and gives 1; SystemExit's code, or its text on stderr and 1).

The random generators a new interpreter seeds from the OS (Python's, NumPy's, torch's) are seeded from the OS again
in each child. What a fork cannot give is a fresh interpreter: the hash seed of str is the server's, what torch
reads from the environment as it loads (OMP_NUM_THREADS, ONEDNN_MAX_CPU_ISA) is the test worker's, and gpfq is
this checkout's. `run_python` refuses interpreter options
(`-S`, `-X…`) and a PYTHONPATH that puts another gpfq first; tests that need those start a real interpreter.
multiprocessing's forkserver does not fit: it runs a function, not a script as __main__ with its own argv, stdio
files and exit status. Nothing else imports this module but tests/helpers.py.

    python python_server.py      # the server: one JSON request a line on stdin, answers a line each on stdout
"""
import atexit
import json
import os
import select
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

TESTS_DIR = Path(__file__).resolve().parent
REPO_ROOT = TESTS_DIR.parent


# ---------------------------------------------------------------- the server and its children

def _exit_status(stop: SystemExit) -> int:
    """The interpreter's exit status for a SystemExit (its text, if any, already written to stderr)."""
    if stop.code is None:
        return 0
    if isinstance(stop.code, int):
        return stop.code & 0xFF
    sys.stderr.write(f"{stop.code}\n")
    return 1


def _is_ours(filename: str) -> bool:
    """A frame of this server or of runpy, which a script's traceback leaves out."""
    import runpy
    return filename in (__file__, runpy.__file__) or filename.startswith("<frozen runpy")


def _reseed() -> None:
    """Seed from the OS what a new interpreter seeds from the OS (a fork would share the server's state)."""
    import random
    import numpy
    import torch
    random.seed()
    numpy.random.seed()
    torch.seed()


def _threads_as_a_new_process() -> None:
    """torch's thread count as a new process would take it: OMP_NUM_THREADS of the run's environment, or else
    torch's own default (what the server found when started without it)."""
    import torch
    requested = os.environ.get("OMP_NUM_THREADS", "").strip()
    threads = int(requested) if requested.isdigit() and int(requested) > 0 else DEFAULT_THREADS
    if threads:
        torch.set_num_threads(threads)


def _child(request: dict) -> None:
    """In the forked child: become `python argv…` in request's cwd and env, run it, and end the process."""
    for fd, path, mode in ((0, os.devnull, os.O_RDONLY), (1, request["stdout"], os.O_WRONLY),
                           (2, request["stderr"], os.O_WRONLY)):
        os.dup2(os.open(path, mode), fd)
    _reseed()
    if request.get("interrupt"):  # Popen's preexec_fn resetting SIGINT, then the interpreter's own handler
        signal.signal(signal.SIGINT, signal.default_int_handler)
    os.chdir(request["cwd"])
    os.environ.clear()
    os.environ.update(request["env"])
    _threads_as_a_new_process()
    argv = request["argv"]
    extra = [p for p in request["env"].get("PYTHONPATH", "").split(os.pathsep) if p]
    status = 0
    try:
        import runpy
        if argv[0] == "-c":
            sys.argv = ["-c", *argv[2:]]
            sys.path[:] = ["", *extra, *BASE_PATH]
            exec(compile(argv[1], "<string>", "exec"), {"__name__": "__main__", "__builtins__": __builtins__})
        elif argv[0] == "-m":
            sys.argv = [argv[1], *argv[2:]]
            sys.path[:] = [os.getcwd(), *extra, *BASE_PATH]
            runpy.run_module(argv[1], run_name="__main__", alter_sys=True)
        else:
            script = os.path.abspath(argv[0])
            sys.argv = list(argv)
            sys.path[:] = [os.path.dirname(script), *extra, *BASE_PATH]
            runpy.run_path(script, run_name="__main__")
    except SystemExit as stop:
        status = _exit_status(stop)
    except BaseException:  # noqa: BLE001 (what the interpreter does with an uncaught exception)
        kind, error, frames = sys.exc_info()
        while frames is not None and _is_ours(frames.tb_frame.f_code.co_filename):
            frames = frames.tb_next  # the traceback starts at the script, as the interpreter's does
        sys.excepthook(kind, error.with_traceback(frames), frames)
        status = -signal.SIGINT if kind is KeyboardInterrupt else 1  # the interpreter dies of SIGINT then
    try:
        threading._shutdown()  # the interpreter waits for non-daemon threads, then runs atexit
        atexit._run_exitfuncs()
        sys.stdout.flush()
        sys.stderr.flush()
    finally:
        if status < 0:
            signal.signal(-status, signal.SIG_DFL)
            os.kill(os.getpid(), -status)
        os._exit(status)


def serve() -> None:
    """Answer requests until stdin closes: for each, fork a child and say its pid; when a child ends, write its
    exit status (as subprocess gives it: -N for signal N) to the request's status file."""
    global DEFAULT_THREADS
    import torch
    DEFAULT_THREADS = None if os.environ.get("OMP_NUM_THREADS") else torch.get_num_threads()
    import gpfq  # with torch, numba and numpy: nearly all of a script's imports (the rest: 0.05 s)
    import torchvision  # noqa: F401
    # Load the compiled kernel once (0.7 s a process) on one thread: a fork must not inherit a started OpenMP team.
    torch.set_num_threads(1)
    gpfq.quantize_layer(torch.ones(2, 4), torch.ones(8, 4), torch.ones(8, 4))
    children, pending, open_ = {}, b"", True
    while open_ or children:
        ready, _, _ = select.select([0] if open_ else [], [], [], 0.02 if children else None)
        if ready:
            chunk = os.read(0, 1 << 16)
            open_ = bool(chunk)
            pending += chunk
            while b"\n" in pending:
                line, pending = pending.split(b"\n", 1)
                request = json.loads(line)
                sys.stdout.flush()
                sys.stderr.flush()
                pid = os.fork()
                if pid == 0:
                    _child(request)
                children[pid] = request["status"]
                os.write(1, (json.dumps({"pid": pid}) + "\n").encode())
        while children:
            pid, wait_status = os.waitpid(-1, os.WNOHANG)
            if pid == 0:
                break
            status = children.pop(pid)
            Path(status + ".part").write_text(str(os.waitstatus_to_exitcode(wait_status)))
            os.replace(status + ".part", status)  # whole or absent


# ---------------------------------------------------------------- the client, in the test process

_server = None
_START_ENV = dict(os.environ)  # the server's, taken at import (collection): not a test's monkeypatched one


def _stop_server() -> None:
    if _server is not None and _server.poll() is None:
        _server.stdin.close()
        _server.wait(timeout=60)


atexit.register(_stop_server)


def _started_server() -> subprocess.Popen:
    global _server
    if _server is None or _server.poll() is not None:
        env = dict(_START_ENV, PYTHONPATH=os.pathsep.join([str(REPO_ROOT), _START_ENV.get("PYTHONPATH", "")]))
        _server = subprocess.Popen([sys.executable, str(Path(__file__).resolve())], stdin=subprocess.PIPE,
                                   stdout=subprocess.PIPE, text=True, env=env, cwd=str(TESTS_DIR))
    return _server


def _check_supported(command: list, env: dict) -> None:
    if command[0] != sys.executable:
        raise ValueError(f"python_server runs {sys.executable} only, not {command[0]}")
    if command[1].startswith("-") and command[1] not in ("-c", "-m"):
        raise ValueError(f"python_server: interpreter option {command[1]} needs a real interpreter (subprocess)")
    first = [p for p in env.get("PYTHONPATH", "").split(os.pathsep) if p][:1]
    if first and (Path(first[0]) / "gpfq").is_dir() and Path(first[0]).resolve() != REPO_ROOT:
        raise ValueError(f"python_server: PYTHONPATH puts another gpfq first ({first[0]}): use subprocess")


class ForkedProcess:
    """subprocess.Popen([sys.executable, …], stdout=PIPE, stderr=PIPE, text=True) for a Python script, `-c code` or
    `-m module`, forked from the server: pid, poll(), wait(timeout), communicate(timeout) -> (stdout, stderr),
    send_signal, kill, returncode. Its output is read when it has ended (files, not pipes). interrupt: Ctrl-C
    raises KeyboardInterrupt even where this process ignores SIGINT (a shell's background job), as Popen with
    preexec_fn=lambda: signal.signal(SIGINT, SIG_DFL) gives. stdout, stderr: paths of files of one's own to
    write them to (e.g. os.devnull), as Popen's open files."""

    def __init__(self, command: list, cwd=None, env=None, interrupt: bool = False, stdout=None, stderr=None):
        self.args = [str(c) for c in command]
        env = dict(os.environ if env is None else env)
        _check_supported(self.args, env)
        self.returncode = None
        self._folder = Path(tempfile.mkdtemp(prefix="forked-"))
        self._out, self._err, self._status = (self._folder / name for name in ("stdout", "stderr", "status"))
        self._out, self._err = (Path(path) if path else default for path, default in ((stdout, self._out),
                                                                                        (stderr, self._err)))
        self._out.touch()
        self._err.touch()
        request = {"argv": self.args[1:], "cwd": str(cwd or os.getcwd()), "env": env, "stdout": str(self._out),
                   "stderr": str(self._err), "status": str(self._status), "interrupt": interrupt}
        server = _started_server()
        server.stdin.write(json.dumps(request) + "\n")
        server.stdin.flush()
        self.pid = json.loads(server.stdout.readline())["pid"]

    def poll(self):
        if self.returncode is None and self._status.exists():
            self.returncode = int(self._status.read_text())
        return self.returncode

    def wait(self, timeout=None):
        deadline = None if timeout is None else time.monotonic() + timeout
        while self.poll() is None:
            if deadline is not None and time.monotonic() > deadline:
                raise subprocess.TimeoutExpired(self.args, timeout)
            time.sleep(0.01)
        return self.returncode

    def communicate(self, timeout=None):
        self.wait(timeout)
        output = (self._out.read_text(errors="replace"), self._err.read_text(errors="replace"))
        shutil.rmtree(self._folder, ignore_errors=True)
        return output

    def send_signal(self, sig):
        if self.poll() is None:  # not yet reaped: the pid is still this child's
            os.kill(self.pid, sig)

    def kill(self):
        self.send_signal(signal.SIGKILL)


def run_python(command: list, cwd=None, env=None, timeout=None, input=None, check=False,
               **_capture) -> subprocess.CompletedProcess:
    """subprocess.run([sys.executable, …], capture_output=True, text=True) for a Python script, `-c code` or `-m
    module`, forked from the server. Returns CompletedProcess(args, returncode, stdout, stderr); raises
    subprocess.TimeoutExpired after `timeout` seconds (the run is killed)."""
    if input is not None:
        raise ValueError("run_python: stdin is /dev/null; a run that reads stdin needs subprocess.run")
    process = ForkedProcess(command, cwd, env)
    try:
        process.wait(timeout)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait()
        raise subprocess.TimeoutExpired(process.args, timeout, *process.communicate()) from None
    done = subprocess.CompletedProcess(process.args, process.returncode, *process.communicate())
    if check:
        done.check_returncode()
    return done


DEFAULT_THREADS = None  # torch's thread count in a process started without OMP_NUM_THREADS, if the server was
BASE_PATH = [p for p in sys.path[1:] if p and Path(p).resolve() not in (REPO_ROOT, TESTS_DIR)]

if __name__ == "__main__":
    serve()
