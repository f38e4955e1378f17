"""The scripts' entry point: known errors as one message and an exit status, no stack trace.

    run_script(main, *args, **kwargs)

runs `main`; an error of `gpfq.errors.GPFQError` (bad input, a result that could not be written)
prints `error: <message>` on stderr and exits with the error's status (2 for bad input). Any other
exception is a bug and keeps its full stack trace. `--debug` on the command line, or the environment
variable GPFQ_DEBUG=1, shows the stack of known errors too.
"""
import os
import sys

from .errors import GPFQError

DEBUG_FLAG = "--debug"
DEBUG_VARIABLE = "GPFQ_DEBUG"


def debug_requested(argv=None) -> bool:
    argv = sys.argv[1:] if argv is None else argv
    return DEBUG_FLAG in argv or os.environ.get(DEBUG_VARIABLE, "").strip() not in ("", "0")


def run_script(main, *args, **kwargs):
    """main(*args, **kwargs), with known errors reported in one message (see the module docstring)."""
    try:
        return main(*args, **kwargs)
    except GPFQError as error:
        if debug_requested():
            raise
        print(f"error: {error}", file=sys.stderr)
        raise SystemExit(error.exit_status) from None
