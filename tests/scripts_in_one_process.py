"""Run several scripts one after another in this one Python process, each as `python SCRIPT ARGS…` from its own
working directory would, and print a JSON list of {"script", "status", "stdout", "stderr"}.

    python scripts_in_one_process.py SPEC.json      # SPEC: [{"script": path, "cwd": folder, "args": [...]}, …]

Each script starts with sys.path[0] = its own folder (as `python SCRIPT` sets it) and the rest of sys.path as
this process had it at its start, without this file's folder (what an earlier script inserted is gone); the
modules a script imported from outside site-packages and gpfq (its own folder's, the repository's) are dropped
before the next one, so no script borrows another's imports.
Importing torch once instead of once per script is the point (tests/test_warnings_and_scripts.py).
"""
import contextlib
import io
import json
import os
import runpy
import sys


def keeps(module) -> bool:
    """A module that may stay loaded between scripts: built in, from an installed package, or gpfq."""
    path = getattr(module, "__file__", None) or ""
    return (not path or "site-packages" in path or path.startswith(sys.base_prefix) or path.startswith(sys.prefix)
            or (getattr(module, "__name__", "").split(".")[0] == "gpfq"))


BASE_PATH = list(sys.path[1:])  # sys.path without this file's folder, before any script could add to it


def run(script: str, cwd: str, args: list) -> dict:
    os.chdir(cwd)
    sys.argv = [script, *args]
    sys.path[:] = [os.path.dirname(os.path.abspath(script)), *BASE_PATH]  # nothing an earlier script inserted
    out, err = io.StringIO(), io.StringIO()
    status = 0
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        try:
            runpy.run_path(script, run_name="__main__")
        except SystemExit as stop:
            status = stop.code if isinstance(stop.code, int) else (0 if stop.code is None else 1)
            if isinstance(stop.code, str):
                err.write(stop.code + "\n")
        except BaseException as error:  # noqa: BLE001 (a script's crash is a result here)
            status = 1
            err.write(f"{type(error).__name__}: {error}\n")
    for name in [name for name, module in sys.modules.items() if not keeps(module)]:
        del sys.modules[name]
    return {"script": script, "status": status, "stdout": out.getvalue(), "stderr": err.getvalue()}


if __name__ == "__main__":
    with open(sys.argv[1]) as handle:
        specs = json.load(handle)
    results = [run(spec["script"], spec["cwd"], spec["args"]) for spec in specs]
    sys.stdout.write(json.dumps(results))
