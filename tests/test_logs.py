import csv
import sys

import pytest
from conftest import python_env
from helpers import append_log_row as append_row
from helpers import foreign_log_error, fresh_log, logged_rows, run_python, script_logs

from gpfq.paths import REPO_ROOT

PLAIN_LOG = "Quantization_Log.csv"
LOG_COLUMNS = script_logs()  # {log file name: columns} of every script's logs
COLUMNS = LOG_COLUMNS[PLAIN_LOG]


def _row(**values):
    row = {c: "" for c in COLUMNS}
    row.update(values)
    return row


def test_append_creates_log_and_keeps_values(tmp_path, capsys):
    path = tmp_path / PLAIN_LOG
    append_row(path, _row(**{"Model Name": "fashion_resnet", "Bits": 4, "Quantized Top1 Accuracy": 0.9123}), COLUMNS)
    assert "created it with its header" in capsys.readouterr().out
    append_row(path, _row(**{"Model Name": "m, with comma", "Bits": 3}), COLUMNS)
    with open(path, newline="") as f:
        lines = list(csv.reader(f))
    assert lines[0] == COLUMNS
    rows = logged_rows(path)
    assert [r["Model Name"] for r in rows] == ["fashion_resnet", "m, with comma"]
    assert rows[0]["Bits"] == "4" and float(rows[0]["Quantized Top1 Accuracy"]) == 0.9123


def test_foreign_header_is_refused_and_untouched(tmp_path):
    path = tmp_path / PLAIN_LOG
    path.write_text("a,b,c\n1,2,3\n")
    with pytest.raises(foreign_log_error(), match="init_logs"):
        append_row(path, _row(), COLUMNS)
    assert path.read_text() == "a,b,c\n1,2,3\n"


def test_init_logs_script_never_loses_a_log(tmp_path):
    """The script as a user runs it, then twice more within the same second (its main() in this process, since
    starting Python with torch takes seconds): every earlier log is kept under its own name."""
    import importlib.util
    script = REPO_ROOT / "logs" / "init_logs.py"
    spec = importlib.util.spec_from_file_location("init_logs_script", script)
    init_logs = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(init_logs)
    for run in range(3):
        if run == 0:
            run_python([sys.executable, str(script), str(tmp_path)], check=True, capture_output=True,
                       env=python_env())
        else:
            init_logs.main(tmp_path)
        append_row(tmp_path / PLAIN_LOG, _row(**{"Seed": len(list(tmp_path.iterdir()))}), COLUMNS)
    # the plain log, which had a row each time, is kept three times: the fresh one and two renamed; the
    # variants' logs held only their header, so they are left as they are rather than archived empty
    for name in LOG_COLUMNS:
        stem = name[: -len(".csv")]
        versions = [p.name for p in tmp_path.iterdir()
                    if p.name == name or (p.name.startswith(stem + "_") and p.name[len(stem) + 1].isdigit())]
        assert len(versions) == (3 if name == PLAIN_LOG else 1), name
    kept = sorted(p.name for p in tmp_path.iterdir()
                  if p.name == PLAIN_LOG or (p.name.startswith("Quantization_Log_") and p.name[17].isdigit()))
    assert len(kept) == 3
    seeds = sorted(logged_rows(tmp_path / name)[0]["Seed"] for name in kept)
    assert len(set(seeds)) == 3  # each log still holds the row written into it


def test_init_log_returns_renamed_old_log(tmp_path):
    path = tmp_path / PLAIN_LOG
    assert fresh_log(path, COLUMNS) is None
    append_row(path, _row(**{"Author": "x"}), COLUMNS)
    old = fresh_log(path, COLUMNS)
    assert logged_rows(old)[0]["Author"] == "x" and logged_rows(path) == []
