"""Prepare the CSV logs: each log starts fresh with its header.

    python3 logs/init_logs.py            # from the repo root or from logs/

An existing log is never deleted: it is renamed <name>_<YYYYmmdd-HHMMSS>.csv first. A log that holds
only its header is already fresh and is left as it is (no empty archives).
"""
import sys
from pathlib import Path

from gpfq.logs import holds_only_header, init_log
from gpfq.paths import LOG_DIR
from gpfq.procedures import LOG_COLUMNS


def main(log_dir=LOG_DIR):
    for name, columns in LOG_COLUMNS.items():
        if holds_only_header(Path(log_dir) / name, columns):
            print(f"{Path(log_dir) / name} holds only its header: left as it is")
            continue
        old = init_log(Path(log_dir) / name, columns)
        kept = f" (the old one is now {old.name})" if old else ""
        print(f"created {Path(log_dir) / name}{kept}")


if __name__ == "__main__":
    main(sys.argv[1] if len(sys.argv) > 1 else LOG_DIR)
