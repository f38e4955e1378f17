"""The scripts' entry point: known errors as one message and an exit status, no stack trace.

    run_script(main, *args, **kwargs)

runs `main`; an error of `gpfq.errors.GPFQError` (bad input, a result that could not be written)
prints `error: <message>` on stderr and exits with the error's status (2 for bad input). Any other
exception is a bug and keeps its full stack trace. `--debug` on the command line, or the environment
variable GPFQ_DEBUG=1, shows the stack of known errors too; the exit status stays the error's.
"""
import os
import sys
import traceback

from gpfq.errors import GPFQError

DEBUG_FLAG = "--debug"
DEBUG_VARIABLE = "GPFQ_DEBUG"


def debug_requested(argv=None, header: dict = None) -> bool:
    """GPFQ_DEBUG=1; else `--debug [True|False]` on the command line (the last one wins; bare: True); else the
    header's `debug`. Read from the raw arguments, since the error may be in parsing them."""
    if os.environ.get(DEBUG_VARIABLE, "").strip() not in ("", "0"):
        return True
    argv = sys.argv[1:] if argv is None else argv
    requested = None
    for position, token in enumerate(argv):
        if token == DEBUG_FLAG:
            value = argv[position + 1] if position + 1 < len(argv) and not argv[position + 1].startswith("--") else ""
            requested = value.strip().lower() not in ("false", "0", "no")
    if requested is not None:
        return requested
    return bool(header) and header.get("debug") is True


def run_script(main, *args, **kwargs):
    """main(*args, **kwargs), with known errors reported in one message (see the module docstring)."""
    try:
        return main(*args, **kwargs)
    except GPFQError as error:
        header = args[0] if args and isinstance(args[0], dict) else None  # a script's HEADER
        if debug_requested(header=header):  # the stack as well, but the same exit status as without it
            traceback.print_exc()
        print(f"error: {error}", file=sys.stderr)
        raise SystemExit(error.exit_status) from None
