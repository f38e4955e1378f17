"""Prepare the CSV logs: each log starts fresh with its header.

    python3 logs/init_logs.py                    # the logs in logs/ (from the repo root or from logs/)
    python3 logs/init_logs.py --log_dir FOLDER   # the logs of the scripts' --log_dir FOLDER

An existing log is never deleted: it is renamed <name>_<YYYYmmdd-HHMMSS>.csv first. A log that holds
only its header is already fresh and is left as it is (no empty archives).
"""
import argparse
from pathlib import Path

from gpfq.runner.logs import holds_only_header, init_log
from gpfq.paths import LOG_DIR
from gpfq.runner.procedures import LOG_COLUMNS


def main(log_dir=LOG_DIR):
    for name, columns in LOG_COLUMNS.items():
        if holds_only_header(Path(log_dir) / name, columns):
            print(f"{Path(log_dir) / name} holds only its header: left as it is")
            continue
        old = init_log(Path(log_dir) / name, columns)
        kept = f" (the old one is now {old.name})" if old else ""
        print(f"created {Path(log_dir) / name}{kept}")


def parse_folder(argv=None) -> Path:
    """The logs' folder from the command line (argparse: --help prints the usage and creates nothing)."""
    parser = argparse.ArgumentParser(prog="init_logs.py", description="Start every CSV log of the scripts fresh "
                                     "with its header; an existing log is renamed with a timestamp, never deleted.")
    parser.add_argument("--log_dir", "--log-dir", metavar="FOLDER", default=None,
                        help=f"the folder of the logs, as the scripts' --log_dir (default: {LOG_DIR})")
    parser.add_argument("folder", nargs="?", default=None, help=argparse.SUPPRESS)  # the older positional form
    args = parser.parse_args(argv)
    if args.log_dir is not None and args.folder is not None and args.log_dir != args.folder:
        parser.error(f"two folders given: --log_dir {args.log_dir} and {args.folder}")
    return Path(args.log_dir or args.folder or LOG_DIR)


if __name__ == "__main__":
    from gpfq.runner.cli import run_script
    run_script(main, parse_folder())
