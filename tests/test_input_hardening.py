"""Input hardening (issue 19): names are names, YAML is plain, values in messages are bounded, and
a file where a folder belongs (or the reverse) is the user's input at fault. Each test runs the real
CLI and checks the exit code (2), the one `error:` line word for word, and that nothing was written
where it should not be."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from ganpipe import cli, runs
from ganpipe.config_files import load_config
from ganpipe.config_values import NAME_RULE
from ganpipe.errors import LINE_CHARS, UserError
from tests.conftest import ROOT, error_lines, write_config

BASE = "data:\n  source: builtin:digits\n  resolution: 16\ntrain:\n  steps: 2\n"


def ganpipe(capsys: pytest.CaptureFixture[str], *args: str) -> tuple[int, list[str]]:
    """Run the CLI in this process: (exit code, every line it wrote to stderr)."""
    code = cli.run(list(args))
    return code, capsys.readouterr().err.splitlines()


@pytest.fixture
def config(tmp_path: Path) -> Path:
    return write_config(tmp_path / "cfg.yaml", BASE)


def files_under(folder: Path) -> list[Path]:
    return sorted(folder.rglob("*")) if folder.exists() else []


# --- names are names -------------------------------------------------------------------------------

def test_run_name_climbing_out_of_runs_is_refused(capsys, config: Path, ganpipe_home: Path) -> None:
    code, err = ganpipe(capsys, "train", str(config), "--set", "train.run_name=../../escaped_run")
    assert code == 2
    assert err == [f"error: {config}: key 'train.run_name': not a name: use letters, digits, '_', '.' and '-', "
                   "starting with a letter or digit, without '..', at most 128 characters (got '../../escaped_run')"]
    # runs/../../escaped_run is GANPIPE_HOME's parent's escaped_run: not there, nor anything in runs/
    assert not (ganpipe_home.parent / "escaped_run").exists()
    assert not (ganpipe_home / "runs").exists()


@pytest.mark.parametrize("how", ["--set", "file"])
def test_absolute_run_name_is_refused_and_the_folder_untouched(capsys, tmp_path: Path, ganpipe_home: Path,
                                                                how: str) -> None:
    victim = tmp_path / "my-project"
    victim.mkdir()
    (victim / "config.yaml").write_text("mine: true\n")
    if how == "--set":
        config = write_config(tmp_path / "cfg.yaml", BASE)
        code, err = ganpipe(capsys, "train", str(config), "--set", f"train.run_name={victim}")
    else:
        config = write_config(tmp_path / "cfg.yaml", BASE + f"  run_name: {victim}\n")
        code, err = ganpipe(capsys, "train", str(config))
    assert code == 2
    assert err == [f"error: {config}: key 'train.run_name': not a name: {NAME_RULE} (got '{victim}')"]
    assert sorted(p.name for p in victim.iterdir()) == ["config.yaml"]
    assert (victim / "config.yaml").read_text() == "mine: true\n"
    assert not (ganpipe_home / "runs").exists()


@pytest.mark.parametrize(("key", "yaml_value", "shown"), [
    ("train.run_name", "a/b", "'a/b'"),
    ("train.run_name", ".hidden", "'.hidden'"),
    ("train.run_name", "-rf", "'-rf'"),
    ("train.run_name", '"tab\\there"', "'tab\\there'"),
    ("train.run_name", '"new\\nline"', "'new\\nline'"),
    ("train.run_name", "a..b", "'a..b'"),
    ("train.run_name", "a" * 129, f"'{'a' * 129}'"),
    ("register.name", "../exports-elsewhere", "'../exports-elsewhere'"),
    ("register.name", "white space", "'white space'"),
    ("register.name", '""', "''"),
])
def test_names_in_the_config_are_names(capsys, tmp_path: Path, ganpipe_home: Path, key: str, yaml_value: str,
                                       shown: str) -> None:
    section, field = key.split(".")
    config = write_config(tmp_path / "cfg.yaml", f"data: {{source: builtin:digits}}\n{section}:\n  {field}: {yaml_value}\n")
    code, err = ganpipe(capsys, "ingest", str(config))
    assert code == 2
    assert err == [f"error: {config}: key '{key}': not a name: {NAME_RULE} (got {shown})"]
    assert files_under(ganpipe_home) == []


def test_good_names_still_load(tmp_path: Path) -> None:
    config = write_config(tmp_path / "cfg.yaml", BASE)
    cfg = load_config(config, ["train.run_name=My_run-2.v1", "register.name=digits.dcgan_v2", f"train.run_name={'r' * 128}"])
    assert cfg.train.run_name == "r" * 128 and cfg.registry.name == "digits.dcgan_v2"


def test_register_name_flag_is_a_name(capsys, tmp_path: Path) -> None:
    code, err = ganpipe(capsys, "register", "--run", str(tmp_path), "--name", "../../models/x")
    assert code == 2
    assert err == [f"error: --name '../../models/x': not a name: {NAME_RULE}"]


def test_run_folder_outside_runs_is_refused_where_it_is_made(config: Path, ganpipe_home: Path) -> None:
    """Defence in depth: a Config changed after validation (assignment is not validated) still
    cannot place a run outside GANPIPE_HOME/runs."""
    cfg = load_config(config)
    for name in ("../escaped", "/tmp/elsewhere", "a/b", ".."):
        cfg.train.run_name = name
        with pytest.raises(UserError, match=r"^train\.run_name: the run folder .* would be outside "):
            runs.run_dir_for(cfg, "auto")
    cfg.train.run_name = "fine"
    assert runs.run_dir_for(cfg, "auto") == ganpipe_home / "runs" / "fine"


# --- YAML: no duplicate keys, no aliases, UTF-8 text -----------------------------------------------

def test_duplicate_section_is_refused_with_its_line(capsys, tmp_path: Path, ganpipe_home: Path) -> None:
    config = write_config(tmp_path / "cfg.yaml", BASE + "model:\n  family: mlp\ntrain:\n  steps: 5000\n")
    code, err = ganpipe(capsys, "ingest", str(config))
    assert code == 2
    assert err == [f"error: {config}:8:1: duplicate key 'train' (first on line 4)"]
    assert files_under(ganpipe_home) == []


@pytest.mark.parametrize(("text", "expected"), [
    ("data:\n  source: builtin:digits\ntrain:\n  steps: 2\n  batch_size: 8\n  steps: 3\n",
     ":6:3: duplicate key 'train.steps' (first on line 4)"),
    ("data: {source: builtin:digits, source: other}\n", ":1:32: duplicate key 'data.source' (first on line 1)"),
    ("data: {source: builtin:digits}\nexport:\n  class_counts: {a: 1, b: 2, a: 3}\n",
     ":3:30: duplicate key 'export.class_counts.a' (first on line 3)"),
])
def test_duplicate_nested_keys_are_refused(capsys, tmp_path: Path, text: str, expected: str) -> None:
    config = write_config(tmp_path / "cfg.yaml", text)
    code, err = ganpipe(capsys, "ingest", str(config))
    assert code == 2 and err == [f"error: {config}{expected}"]


def test_yaml_alias_nest_fails_fast_in_bounded_memory(tmp_path: Path, ganpipe_home: Path) -> None:
    """The issue's probe: 1 kB of nested aliases in data.classes expanded to 8.5 GB and a 2 GB
    error line. Anchors are refused where they appear: at once, in the memory of a bare start."""
    lines = ["data:", "  source: builtin:digits", "  classes:", "  - &l0 [" + ", ".join(["lol"] * 12) + "]"]
    lines += [f"  - &l{i} [" + ", ".join([f"*l{i - 1}"] * 12) + "]" for i in range(1, 13)]
    config = write_config(tmp_path / "laughs.yaml", "\n".join(lines) + "\n")
    assert 900 <= config.stat().st_size <= 1200
    peak_file = tmp_path / "peak-kib"
    # The CLI in a fresh process that reports its own peak resident memory (VmHWM, KiB) when done.
    # Not getrusage: on Linux its ru_maxrss keeps the peak of the forked parent (pytest) across exec.
    script = ("import re, sys; from ganpipe import cli; code = cli.run(sys.argv[1:]); "
              "status = open('/proc/self/status').read(); "
              f"open({str(peak_file)!r}, 'w').write(re.search(r'VmHWM:\\s*(\\d+) kB', status).group(1)); "
              "sys.exit(code)")
    start = time.monotonic()
    result = subprocess.run([sys.executable, "-c", script, "ingest", str(config)], capture_output=True, text=True,
                            cwd=ROOT, timeout=120, env={**os.environ, "PYTHONPATH": str(ROOT)})
    elapsed = time.monotonic() - start
    assert result.returncode == 2, result.stderr
    assert result.stderr.splitlines() == [
        f"error: {config}:4:5: YAML anchor '&l0' refused: configs use no anchors or aliases"]
    assert elapsed < 5, elapsed
    assert int(peak_file.read_text()) < 300 * 1024, "peak RSS (KiB) of a process that refused 1 kB of YAML"
    assert files_under(ganpipe_home) == []


def test_aliases_in_set_values_are_refused(capsys, config: Path) -> None:
    code, err = ganpipe(capsys, "ingest", str(config), "--set", "data.classes=[&a [x, x], *a]")
    assert code == 2
    assert err == ["error: --set data.classes: cannot parse value '[&a [x, x], *a]' (column 2): "
                   "YAML anchor '&a' refused: configs use no anchors or aliases"]


def test_config_that_is_not_utf8_text(capsys, tmp_path: Path) -> None:
    config = tmp_path / "latin1.yaml"
    config.write_bytes("data:\n  source: caf\u00e9\n".encode("latin-1"))
    code, err = ganpipe(capsys, "ingest", str(config))
    assert code == 2
    assert err == [f"error: {config}: not UTF-8 text (byte 0xe9 on line 2, at offset 19)"]


def test_config_with_control_characters(capsys, tmp_path: Path) -> None:
    config = tmp_path / "nul.yaml"
    config.write_bytes(b"data:\n  source: a\x00b\n")
    code, err = ganpipe(capsys, "ingest", str(config))
    assert code == 2
    assert err == [f"error: {config}: YAML syntax error: unacceptable character #x0000: "
                   "special characters are not allowed"]


def test_config_larger_than_any_config(capsys, tmp_path: Path) -> None:
    config = write_config(tmp_path / "huge.yaml", BASE + "# " + "x" * (1 << 20) + "\n")
    code, err = ganpipe(capsys, "ingest", str(config))
    assert code == 2
    assert err == [f"error: config file {config}: {config.stat().st_size} bytes; a config is at most 1048576 bytes"]


def test_saved_config_reloads_strictly(config: Path) -> None:
    """A run's config.yaml is written without anchors, so it reloads under the strict loader."""
    from ganpipe.config_files import config_from_yaml_text

    cfg = load_config(config, ["data.classes=[a, b]", "eval.metrics=[fd_domain, kid]"])
    assert "&" not in cfg.to_yaml() and "*" not in cfg.to_yaml()
    assert config_from_yaml_text(cfg.to_yaml(), "saved").hash() == cfg.hash()


# --- values in messages are bounded; one line ------------------------------------------------------

def test_huge_value_is_shown_bounded(capsys, config: Path) -> None:
    code, err = ganpipe(capsys, "ingest", str(config), "--set", "data.resolution=" + "9x" * 50_000)
    assert code == 2
    shown = "'" + "9x" * 99 + "9...(100000 chars)"
    assert err == [f"error: {config}: key 'data.resolution': Input should be a valid integer, unable to parse "
                   f"string as an integer (got {shown})"]


def test_huge_list_is_shown_abbreviated(capsys, config: Path) -> None:
    value = "[" + ", ".join(str(i) for i in range(100_000)) + "]"
    code, err = ganpipe(capsys, "ingest", str(config), "--set", f"data.classes={value}")
    assert code == 2
    assert err == [f"error: {config}: key 'data.classes[0]': Input should be a valid string (got 0)"]
    code, err = ganpipe(capsys, "ingest", str(config), "--set", f"data.resolution={value}")
    assert code == 2
    assert err == [f"error: {config}: key 'data.resolution': Input should be a valid integer "
                   "(got [0, 1, 2, 3, 4, 5, 6, 7, 8, 9, ...])"]


def test_every_error_line_is_one_bounded_line(capsys) -> None:
    """The CLI's safety net, for messages not bounded where they were made."""
    cli.print_error("first\n" + "y" * 100_000 + "\n\n  last  \n")
    err = capsys.readouterr().err.splitlines()
    joined = len("first | ") + 100_000 + len(" | last")
    assert err == [f"error: first | {'y' * (LINE_CHARS - 8)}...({joined} chars)"]


def test_set_parse_error_is_one_line(capsys, config: Path) -> None:
    code, err = ganpipe(capsys, "ingest", str(config), "--set", "data.classes=[a,")
    assert code == 2
    assert err == ["error: --set data.classes: cannot parse value '[a,' (column 4): YAML syntax error: "
                   "expected the node content, but found '<stream end>'"]


def test_set_value_too_long_for_an_integer(capsys, config: Path) -> None:
    code, err = ganpipe(capsys, "ingest", str(config), "--set", "train.steps=" + "9" * 5000)
    assert code == 2 and len(err) == 1
    assert err[0].startswith(f"error: --set train.steps: cannot parse value '{'9' * 199}...(5000 chars): bad value: ")


# --- numbers that only failed inside the training worker ---------------------------------------------

@pytest.mark.parametrize(("override", "expected"), [
    ("train.betas=[2,3]", "key 'train.betas[0]': Input should be less than 1 (got 2)"),
    ("train.betas=[0.5,1.0]", "key 'train.betas[1]': Input should be less than 1 (got 1.0)"),
    ("train.betas=[-0.1,0.9]", "key 'train.betas[0]': Input should be greater than or equal to 0 (got -0.1)"),
    ("train.betas=[0.5]", "missing required key 'train.betas[1]'"),
    ("train.g_lr=.inf", "key 'train.g_lr': Input should be a finite number (got inf)"),
    ("train.d_lr=.nan", "key 'train.d_lr': Input should be a finite number (got nan)"),
    ("train.gp_weight=.inf", "key 'train.gp_weight': Input should be a finite number (got inf)"),
    ("export.seed=-1", "key 'export.seed': seed must be in [0, 2**31) (got -1)"),
    ("train.batch_size=30", "train.batch_size 30 must divide into 4 processes x 1 accumulation steps x model.pack 1"),
])
def test_optimiser_settings_are_checked_when_the_config_loads(capsys, tmp_path: Path, ganpipe_home: Path,
                                                              override: str, expected: str) -> None:
    config = write_config(tmp_path / "cfg.yaml", BASE + "  num_processes: 4\n")
    code, err = ganpipe(capsys, "train", str(config), "--set", override)
    assert code == 2
    assert err == [f"error: {config}: {expected}"]
    assert files_under(ganpipe_home) == []


# --- files where folders belong, and the reverse -----------------------------------------------------

def test_config_path_that_is_a_folder(capsys, tmp_path: Path) -> None:
    code, err = ganpipe(capsys, "train", str(tmp_path))
    assert code == 2
    assert err == [f"error: config file {tmp_path}: is a folder, not a YAML file"]


def test_ganpipe_home_that_is_a_file(capsys, config: Path, tmp_path: Path, monkeypatch) -> None:
    home = tmp_path / "home-file"
    home.write_text("not a folder\n")
    monkeypatch.setenv("GANPIPE_HOME", str(home))
    code, err = ganpipe(capsys, "ingest", str(config))
    assert code == 2
    assert err == [f"error: GANPIPE_HOME: {home} is a file, not a folder"]
    assert home.read_text() == "not a folder\n"
    monkeypatch.setenv("GANPIPE_HOME", str(home / "below"))
    code, err = ganpipe(capsys, "ingest", str(config))
    assert code == 2 and err == [f"error: GANPIPE_HOME: {home} is a file, not a folder"]


def test_data_cache_that_is_a_file(capsys, config: Path, tmp_path: Path) -> None:
    cache = tmp_path / "cache-file"
    cache.write_text("keep\n")
    code, err = ganpipe(capsys, "ingest", str(config), "--set", f"data.cache={cache}")
    assert code == 2
    assert err == [f"error: data.cache: {cache} is a file, not a folder"]
    assert cache.read_text() == "keep\n"


@pytest.mark.parametrize("command", ["export", "augment"])
def test_out_that_is_a_file(capsys, tmp_path: Path, command: str) -> None:
    out = tmp_path / "notes.txt"
    out.write_text("my notes\n")
    if command == "export":
        code, err = ganpipe(capsys, "export", "--model", str(tmp_path / "no-run"), "--num-images", "4", "--out", str(out))
        expected = f"error: --out: {out} is a file, not a folder"
    else:
        code, err = ganpipe(capsys, "augment", "--real", "builtin:digits", "--synthetic", str(tmp_path / "no-run"),
                            "--ratio", "0.5", "--out", str(out / "sub"))
        expected = f"error: --out: {out} is a file, not a folder"
    assert code == 2 and err == [expected]
    assert out.read_text() == "my notes\n"


def test_register_run_that_is_a_file(capsys, tmp_path: Path) -> None:
    run = tmp_path / "run.json"
    run.write_text(json.dumps({"name": "x"}))
    code, err = ganpipe(capsys, "register", "--run", str(run))
    assert code == 2
    assert err == [f"error: --run {run}: is a file, not a run directory"]


def test_every_error_here_is_one_line_in_a_real_process(tmp_path: Path) -> None:
    """The same refusals through `python -m ganpipe.cli`: one `error:` line, no traceback, no stdout."""
    from tests.conftest import run_cli

    config = write_config(tmp_path / "cfg.yaml", BASE + "train:\n  steps: 3\n")
    result = run_cli("train", str(config), "--json")
    assert result.returncode == 2 and result.stdout == ""
    assert error_lines(result.stderr) == result.stderr.splitlines() == [
        f"error: {config}:6:1: duplicate key 'train' (first on line 4)"]
