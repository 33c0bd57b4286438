"""The package's shape: the library never imports the study layer, and the command line starts without torch."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from spineseg import cli
from spineseg.errors import ConfigError

ROOT = Path(__file__).resolve().parents[1]
HEAVY = ("torch", "segmentation_models_pytorch", "timm", "SimpleITK")


def test_import_contracts_hold():
    """import-linter: every module is placed in a layer, and no library module imports spineseg.study or the CLI."""
    result = subprocess.run([sys.executable, "-c", "from importlinter.cli import lint_imports; "
                             "raise SystemExit(lint_imports(config_filename='pyproject.toml', no_cache=True, no_logo=True))"],
                            cwd=ROOT, capture_output=True, text=True)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "broken" in result.stdout and "0 broken" in result.stdout


def _heavy_modules_after(code: str, cwd: Path) -> list[str]:
    probe = f"import sys\n{code}\nprint(sorted(m for m in {HEAVY!r} if m in sys.modules))"
    result = subprocess.run([sys.executable, "-c", probe], cwd=cwd, capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    return eval(result.stdout.strip().splitlines()[-1])


def test_help_imports_no_torch(tmp_path):
    code = "from spineseg.cli import main\ntry:\n    main(['--help'])\nexcept SystemExit:\n    pass"
    assert _heavy_modules_after(code, tmp_path) == []


PROFILE_ERRORS = [["run", "--profile", "nope"], ["run", "--profile", "smoke", "--set", "stage2.repeats=many"],
                  ["run", "--profile", "smoke", "--stages", "9"]]


def test_a_profile_error_imports_no_torch():
    """Each error in turn, in one interpreter (a module once imported stays in sys.modules, so none of them imported
    torch if it is absent after the last; one interpreter start instead of three saves 2-3 s of `make check`)."""
    code = "from spineseg.cli import main\n" + "".join(f"assert main({args!r}) == 2, {args!r}\n" for args in PROFILE_ERRORS)
    assert _heavy_modules_after(code, ROOT) == []


def test_cli_prints_a_users_error_as_one_line_but_keeps_a_bugs_traceback(monkeypatch, capsys):
    def user_error(args):
        raise ConfigError("stage2.repeats = 0: must be at least 1")

    def bug(args):
        raise KeyError("an internal key")

    parser = cli.build_parser()
    monkeypatch.setattr(cli, "build_parser", lambda: parser)
    parser.set_defaults(func=user_error)
    for action in parser._subparsers._group_actions[0].choices.values():
        action.set_defaults(func=user_error)
    assert cli.main(["run"]) == 2
    assert capsys.readouterr().err == "spineseg: error: stage2.repeats = 0: must be at least 1\n"
    parser._subparsers._group_actions[0].choices["run"].set_defaults(func=bug)
    with pytest.raises(KeyError, match="an internal key"):
        cli.main(["run"])
