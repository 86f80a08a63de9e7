"""The `tso` console script as a user runs it."""

import re
import subprocess
import sys
from pathlib import Path

import yaml


def _tso(*args, cwd=None):
    return subprocess.run([sys.executable, "-m", "tso.cli", *args], capture_output=True, text=True, cwd=cwd, timeout=120)


def test_help_lists_subcommands():
    out = _tso("--help")
    assert out.returncode == 0
    assert "config" in out.stdout


def test_config_check_reports_sources_and_errors(tmp_path):
    from tests.test_config import BASE

    good = tmp_path / "good.yaml"
    good.write_text(yaml.safe_dump(BASE))
    out = _tso("config", "check", str(good))
    assert out.returncode == 0, out.stderr
    assert "base v2-m" in out.stdout and "'v2-l': 0.5" in out.stdout
    bad = dict(BASE, stages=0)
    p = tmp_path / "bad.yaml"
    p.write_text(yaml.safe_dump(bad))
    out = _tso("config", "check", str(p))
    assert out.returncode == 2
    assert f"{p}: stages: Input should be greater than or equal to 1" in out.stderr
    assert "Traceback" not in out.stderr


def test_builtin_configs_validate():
    for path in sorted((Path(__file__).parents[1] / "tso" / "configs").glob("*.yaml")):
        out = _tso("config", "check", str(path))
        assert out.returncode == 0, f"{path}: {out.stderr}"


def test_readme_configuration_reference_is_current():
    from tso.commands import config_reference

    readme = (Path(__file__).parents[1] / "README.md").read_text()
    start = readme.index("<!-- config-reference:start -->\n") + len("<!-- config-reference:start -->\n")
    end = readme.index("<!-- config-reference:end -->")
    assert readme[start:end] == config_reference(), "regenerate with `tso config reference`"


def test_configuration_reference_shows_the_defaults_a_config_really_gets():
    """Every default in the table is the value a minimal config holds (nested defaults included: the
    judge decodes greedily, evaluation allows 2048 new tokens)."""
    from tso.commands import config_reference
    from tso.config import parse_config

    cfg = parse_config({"matrix": {"base": "b", "models": [
        {"name": "a", "path": "/m/a", "version": 1, "size": 1}, {"name": "b", "path": "/m/b", "version": 1, "size": 2},
        {"name": "c", "path": "/m/c", "version": 1, "size": 4}]}})
    checked = 0
    for row in config_reference().splitlines()[2:]:
        field, _, default = (c.strip() for c in re.split(r"(?<!\\)\|", row.strip("|"))[:3])
        path = field.strip("`")
        if "[]" in path or default == "required" or path in ("run_dir",):
            continue
        value = cfg
        for part in path.split("."):
            value = getattr(value, part)
            if value is None and part != path.split(".")[-1]:
                break  # an optional section (train.lora): its rows are the defaults once it is given
        else:
            assert default == f"`{value!r}`".replace("|", "\\|"), (path, default, value)
            checked += 1
    assert checked > 90
    assert "| `judge.sampling.temperature` | float | `0.0` |" in config_reference()
    assert "| `eval.sampling.max_new_tokens` | int | `2048` |" in config_reference()
