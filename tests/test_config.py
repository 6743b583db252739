"""Typed configuration: validation on load, overrides, and bad input at the door (exit 2)."""

from __future__ import annotations

from pathlib import Path

import pytest

from ganpipe.config import Config
from ganpipe.config_files import load_config
from ganpipe.errors import UserError
from tests.conftest import ROOT, error_lines, run_cli, write_config


def test_shipped_configs_validate() -> None:
    for path in sorted((ROOT / "configs").glob("*.yaml")):
        cfg = load_config(path)
        assert isinstance(cfg, Config), path


def test_overrides_are_typed_and_nested(tmp_path: Path) -> None:
    cfg = load_config(ROOT / "configs/digits-dcgan.yaml",
                      ["train.steps=7", "eval.metrics=[fd_domain, kid]", "train.betas=[0.0, 0.9]",
                       "register.name=other", "data.label_column=label"])
    assert cfg.train.steps == 7
    assert cfg.eval.metrics == ["fd_domain", "kid"]
    assert cfg.train.betas == (0.0, 0.9)
    assert cfg.registry.name == "other"
    assert cfg.data.label_column == "label"
    assert "register:" in cfg.to_yaml() and "registry:" not in cfg.to_yaml()


def test_bare_no_is_not_a_boolean_for_mixed_precision(tmp_path: Path) -> None:
    path = write_config(tmp_path / "c.yaml", "data: {source: x}\ntrain: {mixed_precision: no}\n")
    assert load_config(path).train.mixed_precision == "no"
    assert load_config(path, ["train.mixed_precision=no"]).train.mixed_precision == "no"
    assert load_config(path, ["train.mixed_precision=bf16"]).train.mixed_precision == "bf16"


def test_hash_ignores_formatting_but_not_values(tmp_path: Path) -> None:
    a = write_config(tmp_path / "a.yaml", "data: {source: x}\ntrain: {steps: 5}\n")
    b = write_config(tmp_path / "b.yaml", "train:\n  steps: 5\ndata:\n  source: x   # comment\n")
    assert load_config(a).hash() == load_config(b).hash()
    assert load_config(a, ["train.steps=6"]).hash() != load_config(a).hash()


@pytest.mark.parametrize(("text", "overrides", "expected"), [
    ("data: {source: x}\ntrain: {stepz: 5}\n", [], "unknown key 'train.stepz'"),
    ("data: {source: x}\ntrain: {steps: many}\n", [], "key 'train.steps'"),
    ("data: {source: x}\ntrain: {steps: -1}\n", [], "key 'train.steps'"),
    ("train: {steps: 5}\n", [], "missing required key 'data'"),
    ("data: {source: x}\n", ["train.loss=wasserstein"], "key 'train.loss'"),
    ("data: {source: x}\n", ["nosuchsection.key=1"], "unknown key 'nosuchsection'"),
    ("data: {source: x, kind: vector}\n", [], "data.columns is required"),
    ("data: {source: x}\n", ["train.final_generator=best", "train.best_metric=none"],
     "train.final_generator 'best' needs checkpoint scores"),
])
def test_bad_config_names_file_and_key(tmp_path: Path, text: str, overrides: list[str], expected: str) -> None:
    path = write_config(tmp_path / "bad.yaml", text)
    with pytest.raises(UserError) as info:
        load_config(path, overrides)
    assert str(path) in str(info.value)
    assert expected in str(info.value) and "Value error" not in str(info.value)


def test_yaml_syntax_error_names_line(tmp_path: Path) -> None:
    path = write_config(tmp_path / "broken.yaml", "data:\n  source: x\ntrain: [unclosed\n")
    with pytest.raises(UserError) as info:
        load_config(path)
    assert f"{path}:" in str(info.value) and "YAML syntax error" in str(info.value)


def test_missing_file(tmp_path: Path) -> None:
    with pytest.raises(UserError, match="config file not found"):
        load_config(tmp_path / "nope.yaml")


@pytest.mark.parametrize(("name", "text", "expected"), [
    ("missing.yaml", None, "config file not found"),
    ("syntax.yaml", "data: [\n", "YAML syntax error"),
    ("unknown.yaml", "data: {source: x}\nmodel: {famly: dcgan}\n", "unknown key 'model.famly'"),
    ("type.yaml", "data: {source: x}\ntrain: {batch_size: big}\n", "key 'train.batch_size'"),
])
def test_cli_bad_input_exits_2_with_one_error_line(tmp_path: Path, name: str, text: str | None,
                                                   expected: str) -> None:
    path = tmp_path / name
    if text is not None:
        path.write_text(text)
    for command in (["ingest"], ["train"], ["pipeline"]):
        result = run_cli(*command, str(path), "--json")
        assert result.returncode == 2, result.stderr
        errors = error_lines(result.stderr)
        assert len(errors) == 1 and expected in errors[0] and name in errors[0], result.stderr
        assert "Traceback" not in result.stderr
        assert result.stdout == ""


def test_cli_bad_flag_value_exits_2() -> None:
    result = run_cli("train", "configs/digits-dcgan.yaml", "--resume", "sometimes")
    assert result.returncode == 2
    assert len(error_lines(result.stderr)) == 1


def test_the_held_out_share_is_the_key_or_srgans_default_in_one_place() -> None:
    from ganpipe.config import DataConfig

    assert DataConfig(source="x").effective_holdout_fraction == 0.1  # a bare section: the default
    assert DataConfig(source="x", holdout_fraction=0.25).effective_holdout_fraction == 0.25
    srgan = Config(data={"source": "x"}, model={"family": "srgan"})
    assert srgan.data.holdout_fraction == srgan.data.effective_holdout_fraction == 0.1
    assert "effective_holdout_fraction" not in srgan.to_dict()["data"]  # not a key: the config hash is unchanged
