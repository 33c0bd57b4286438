"""Packaging: environment.yml agrees with pyproject.toml, notebooks are stored clean and thin."""

import json
import re
from pathlib import Path

import tomllib
import yaml

from spineseg.study.core.artifacts import NOTEBOOKS
from spineseg.study.runner import notebook_parameters

ROOT = Path(__file__).resolve().parents[1]


def test_environment_yml_installs_this_package_with_declared_extras():
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    env = yaml.safe_load((ROOT / "environment.yml").read_text())
    conda = [d for d in env["dependencies"] if isinstance(d, str)]
    pip = next(d["pip"] for d in env["dependencies"] if isinstance(d, dict))
    python = next(d for d in conda if d.startswith("python"))
    version = tuple(int(x) for x in python.split("=")[1].split("."))
    low, high = re.match(r">=(\d+\.\d+),<(\d+\.\d+)", project["requires-python"]).groups()
    assert tuple(map(int, low.split("."))) <= version < tuple(map(int, high.split(".")))
    assert "pip" in conda
    # pyproject.toml is the single source of dependencies: conda adds only python and pip
    assert set(conda) == {python, "pip"}
    assert len(pip) == 1
    extras = re.fullmatch(r"-e \.\[(.*)\]", pip[0]).group(1).split(",")
    assert set(extras) <= set(project["optional-dependencies"])


def test_notebooks_are_stored_without_outputs_and_have_a_parameters_cell():
    for name in NOTEBOOKS:
        notebook = json.loads((ROOT / "notebooks" / f"{name}.ipynb").read_text())
        code = [c for c in notebook["cells"] if c["cell_type"] == "code"]
        assert all(not c.get("outputs") and c.get("execution_count") is None for c in code), name
        tagged = [c for c in code if "parameters" in c.get("metadata", {}).get("tags", [])]
        assert len(tagged) == 1, name


def test_every_notebook_declares_exactly_the_parameters_the_runner_passes_typed_and_commented():
    import papermill

    passed = notebook_parameters("quick", {}, ROOT)
    for name in NOTEBOOKS:
        declared = papermill.inspect_notebook(str(ROOT / "notebooks" / f"{name}.ipynb"))
        assert set(declared) == set(passed), name
        for parameter, info in declared.items():
            assert info["inferred_type_name"] == type(passed[parameter]).__name__, (name, parameter)
            assert info["help"], (name, parameter)  # `papermill --help-notebook` explains it


def test_every_notebook_starts_with_the_same_setup_call():
    setups = set()
    for name in NOTEBOOKS:
        notebook = json.loads((ROOT / "notebooks" / f"{name}.ipynb").read_text())
        code = [c for c in notebook["cells"] if c["cell_type"] == "code"]
        setups.add("".join(code[1]["source"]).replace(f'notebook="{name}"', 'notebook=<its name>'))
    assert setups == {"from spineseg.study.notebook import start\n\n"
                      "study, data = start(profile, overrides, project_dir, notebook=<its name>, in_place=in_place)"}


def test_notebooks_are_thin():
    for name in NOTEBOOKS:
        notebook = json.loads((ROOT / "notebooks" / f"{name}.ipynb").read_text())
        source = "".join("".join(c["source"]) for c in notebook["cells"] if c["cell_type"] == "code")
        assert "def " not in source and "class " not in source, f"{name}: logic belongs in src/spineseg"
