"""QuantConfig is the one place of the quantization hyperparameters: the scripts' headers, its fields and
the log columns agree, and its checks give the messages the scripts have always given."""
import dataclasses
import re

import pytest
from conftest import script_header

from gpfq import QuantConfig
from gpfq.config import CONFIG_COLUMNS, FIELDS, GRID_FIELDS
from gpfq.paths import REPO_ROOT
from helpers import (common_help, filled_columns, grid_axes, grid_notes, grid_points, header_help, point_config,
                     point_log_values, points_run, run_columns, run_keys, run_settings, script_logs, script_own_keys,
                     script_result_columns, script_settings)

SCRIPTS = ("quantization_scripts", "adhoc_quantization_scripts", "retraining_scripts")


@pytest.mark.parametrize("folder", sorted(SCRIPTS))
def test_every_header_key_is_a_field_a_run_key_or_the_procedures(folder):
    header = script_header(folder)
    assert set(FIELDS) <= set(header)  # every script can set every hyperparameter
    # every key the script takes: its header's and those every script takes (script_settings holds both)
    assert set(script_settings(folder)) == set(FIELDS) | run_keys() | script_own_keys(folder)
    assert not set(FIELDS) & run_keys() and not set(FIELDS) & script_own_keys(folder)
    # a run key is a field of the run settings the runner parses a point into
    assert run_keys() <= set(run_settings(grid_points("quantization_scripts")[0]))


@pytest.mark.parametrize("folder", sorted(SCRIPTS))
def test_header_defaults_are_the_config_defaults(folder):
    header = script_header(folder)
    config = point_config(grid_points(folder)[0])
    assert config == QuantConfig()
    for item in dataclasses.fields(QuantConfig):  # a grid axis's default is written as a one-value list
        value = header[item.name]
        if item.metadata["grid"] and isinstance(value, list):
            assert len(value) == 1, item.name
            value = value[0]
        assert value == item.default or (item.name == "ignore_layers" and list(value) == list(item.default))


def test_log_columns_come_from_the_config_and_the_run_keys():
    point = grid_points("quantization_scripts")[0]
    # the weights are a run key with a column: other weights make another point (resume)
    assert list(point_log_values(point)) == (["Model Name", "Dataset"] + list(CONFIG_COLUMNS)
                                             + ["Weights", "Eval Subset"])
    assert {"Model Name", "Dataset", "Weights"} <= run_columns()
    for name, columns in script_logs().items():
        assert set(CONFIG_COLUMNS) <= set(columns), name


@pytest.mark.parametrize("folder", sorted(SCRIPTS))
def test_logs_hold_exactly_the_config_run_and_procedure_columns(folder):
    """Every column of every log is a result, or is filled from the point (config, run keys, procedure)."""
    filled = filled_columns(folder)
    results = script_result_columns(folder)
    for name, columns in script_logs(folder).items():
        assert {c for c in columns if c not in results} == filled - results, name
        assert set(columns) >= filled, name


def test_grid_axes_keep_their_order():
    """The order of the axes fixes the order in which a grid's points run and log."""
    assert grid_axes() == ("model_name", "method", "bits", "batch_size", "mlp_scalar", "cnn_scalar", "mlp_percentile",
                         "cnn_percentile", "alphabet", "include_0", "retain_rate", "seed", "alphabet_granularity",
                         "fold_batchnorm", "sparsity_threshold", "thresholding", "gptq_block_size", "gptq_damping",
                         "gptq_act_order", "engine", "calibration", "gpfq_first_column", "column_order",
                         "qronos_damping", "act_bits")  # new axes go last: old grids keep their order
    assert grid_axes()[1:] == GRID_FIELDS


@pytest.mark.parametrize("changes,message", [
    (dict(bits=0), "bits must be a positive integer, got 0"),
    (dict(bits=True), "bits must be a positive integer, got True"),
    (dict(mlp_scalar=0), "mlp_scalar must be a number > 0, got 0"),
    (dict(cnn_percentile=1.5), r"cnn_percentile must be in \(0, 1\], got 1.5"),
    (dict(retain_rate=0), r"retain_rate must be in \(0, 1\], got 0"),
    (dict(batch_size=0), r"batch_size \(m\) must be an integer ≥ 1, got 0"),
    (dict(method="sgd"), "method must be one of"),
    (dict(alphabet="x"), "alphabet must be one of"),
    (dict(alphabet_granularity="row"), "alphabet_granularity must be one of"),
    (dict(method="sparse_gpfq", include_0=False), "sparse_gpfq needs the level 0"),
    (dict(gptq_damping=-1), "gptq_damping must be a number ≥ 0, got -1"),
    (dict(engine="fast"), "engine must be one of"),
    (dict(calibration="once"), "calibration must be one of"),
    (dict(patch_stride="pixel"), "patch_stride must be 'kernel' or 'layer', got 'pixel'"),
    (dict(ignore_layers=["fc"]), r"ignore_layers must be a list of layer indices, got \['fc'\]"),
])
def test_bad_values_are_refused_with_the_scripts_messages(changes, message):
    with pytest.raises(ValueError, match="bad hyperparameter: " + message):
        QuantConfig(**changes)


def test_config_is_frozen_and_lists_become_tuples():
    config = QuantConfig(ignore_layers=[0, -1])
    assert config.ignore_layers == (0, -1)
    with pytest.raises(dataclasses.FrozenInstanceError):
        config.bits = 3
    assert config.replace(bits=3).bits == 3 and config.bits == 4


def test_pyproject_lists_requirements_txt():
    text = (REPO_ROOT / "pyproject.toml").read_text()
    dependencies = re.search(r"^dependencies = \[(.*?)^\]", text, re.S | re.M).group(1)
    requirements = [line.strip() for line in (REPO_ROOT / "requirements.txt").read_text().splitlines()
                    if line.strip() and not line.startswith("#")]
    assert re.findall(r'"([^"]+)"', dependencies) == requirements
    assert re.search(r'^dev = \[.*"pytest', text, re.M)


def test_a_repeated_grid_value_runs_once_and_says_so(tmp_path, capsys):
    """`--bits 4 4` (or `batch_size = [32, 32]`) is one point, not the same point twice with two log rows."""
    header = script_header("quantization_scripts")
    points, said = grid_notes(dict(header, batch_size=[32, 32]), "--bits", "4", "3", "4")
    assert [(p["bits"], p["batch_size"]) for p in points] == [(4, 32), (3, 32)]
    assert said == ["note: repeated grid values (bits [4, 3, 4]; batch_size [32, 32]): each grid point runs once "
                    "(2 points, not 6)"]
    assert len(grid_points(header, "--bits", "4", "4.0")) == 2  # 4.0 is left for validate to refuse
    ran = [config.bits for config in points_run(header, "--bits", "4", "4", "--log_dir", str(tmp_path / "logs"),
                                                "--model_dir", str(tmp_path / "models"))]
    assert ran == [4]
    assert "note: repeated grid values (bits [4, 4]): each grid point runs once (1 point, not 2)" in capsys.readouterr().out


def test_header_comments_read_each_key_and_its_continuation_lines(tmp_path):
    script = tmp_path / "script.py"
    script.write_text('# ---- header\nname = "a#b"   # what it is,\n               #   and more\nplain = 1\n'
                      'other = [1,\n         2]   # a list\n# ---- end (a column-0 comment continues nothing)\n'
                      'x = 2  # x\n   # another column: not x\n')
    assert header_help(script) == {"name": "what it is, and more", "other": "a list", "x": "x"}


@pytest.mark.parametrize("folder", sorted(SCRIPTS))
def test_help_shows_every_keys_meaning_from_the_header(folder, monkeypatch, capsys):
    """`quantize.py --help`: each key's header comment (continuation lines joined), then its default."""
    import runpy
    import sys
    comments = header_help(REPO_ROOT / folder / "quantize.py")
    assert "timm:<name>" in comments["model_name"] and comments["bits"] == "bits per weight"
    assert [key for key in script_header(folder) if key not in {**common_help(), **comments}] == []
    # the script itself, in this process (the help needs no fresh interpreter; the scripts' own start from
    # anywhere is tests/test_warnings_and_scripts.py's)
    monkeypatch.setattr(sys, "argv", [str(REPO_ROOT / folder / "quantize.py"), "--help"])
    with pytest.raises(SystemExit) as stop:
        runpy.run_path(str(REPO_ROOT / folder / "quantize.py"), run_name="__main__")
    assert stop.value.code == 0
    text = " ".join(capsys.readouterr().out.split())  # argparse wraps the lines
    assert "--bits [VALUE ...] bits per weight (header: [4])" in text
    assert f"--model [VALUE ...] {comments['model_name']} (header: 'fashion_resnet')" in text
    assert "--debug [VALUE ...] True: known errors show their stack trace too (header: False)" in text


def test_for_layer_resolves_ignore_layers_the_layer_choices_and_the_layers_seed():
    """One function gives each layer's config: ignore_layers (negative from the end), the last matching choice
    (index or fnmatch pattern; bits alone or fields), and the layer's seed, seed · 1 000 003 + index."""
    config = QuantConfig(bits=4, seed=2, ignore_layers=[-1]).with_layers({0: None, "fc*": 8, 1: {"method": "msq"}})
    assert config.for_layer(0, "conv1", 4) is None
    assert config.for_layer(3, "fc2", 4) is None  # ignore_layers -1 wins over the pattern
    assert config.for_layer(1, "conv2", 4) == QuantConfig(method="msq", bits=4, seed=2_000_007, ignore_layers=[-1])
    assert config.for_layer(2, "fc1", 4) == QuantConfig(bits=8, seed=2_000_008, ignore_layers=[-1])
    assert QuantConfig(seed=3).for_layer(0, "conv1", 1) == QuantConfig(seed=3_000_009)
    only = QuantConfig().with_layers([1, "fc*"])  # a list: only those layers are quantized
    assert [only.for_layer(i, name, 4) is not None for i, name in enumerate(["a", "b", "fc1", "c"])] == [
        False, True, True, False]


def test_layer_choices_survive_replace_and_count_in_equality():
    """with_layers' choices are part of what a config quantizes: replace() keeps them, == tells them apart, and
    a layer's own config carries none."""
    chosen = QuantConfig(bits=4).with_layers({0: None, "fc*": 8})
    three = chosen.replace(bits=3)
    assert three.for_layer(0, "conv1", 3) is None and three.for_layer(2, "fc1", 3).bits == 8
    assert three.for_layer(1, "conv2", 3).bits == 3
    assert chosen != QuantConfig(bits=4) and chosen == QuantConfig(bits=4).with_layers({0: None, "fc*": 8})
    assert chosen != QuantConfig(bits=4).with_layers({0: None})
    assert hash(chosen) == hash(QuantConfig(bits=4))  # equal configs hash alike; the choices only refine ==
    layer = chosen.for_layer(1, "conv2", 3)
    assert layer == QuantConfig(bits=4, seed=layer.seed) and layer.for_layer(0, "conv1", 3) is not None
