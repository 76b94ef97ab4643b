"""The shape of the code: sfron/ takes settings, never a command line; it imports no script; no long signatures."""
import ast
import glob
import os

import pytest

from helpers import ROOT
from sfron.utils import UserError

LIBRARY = sorted(glob.glob(os.path.join(ROOT, "sfron", "*.py")) + glob.glob(os.path.join(ROOT, "diffusion", "*.py"))
                 + [os.path.join(ROOT, "models.py")])
SCRIPTS = sorted(f for f in glob.glob(os.path.join(ROOT, "*.py")) if os.path.basename(f) != "models.py")


def functions(path):
    """(name, parameter names) of every function and method defined in a file."""
    for node in ast.walk(ast.parse(open(path).read())):
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
            a = node.args
            names = [x.arg for x in a.posonlyargs + a.args + a.kwonlyargs]
            names += [f"*{a.vararg.arg}"] if a.vararg else []
            names += [f"**{a.kwarg.arg}"] if a.kwarg else []
            yield node.name, names


def imported_modules(path):
    """The top-level names of every module a file imports (relative imports excluded)."""
    for node in ast.walk(ast.parse(open(path).read())):
        if isinstance(node, ast.Import):
            yield from (alias.name.split(".")[0] for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.level == 0:
            yield node.module.split(".")[0]


def test_no_function_takes_more_than_eight_parameters():
    """sfron/ and the top-level scripts (the DiT constructor in models.py keeps the official arguments)."""
    files = sorted(glob.glob(os.path.join(ROOT, "sfron", "*.py"))) + SCRIPTS
    long = [(os.path.relpath(f, ROOT), name, len(params)) for f in files for name, params in functions(f)
            if len(params) > 8]
    assert long == []


def test_the_library_imports_no_script():
    scripts = {os.path.splitext(os.path.basename(f))[0] for f in SCRIPTS}
    assert "download" in scripts and "cli" in scripts
    found = [(os.path.relpath(f, ROOT), m) for f in LIBRARY for m in imported_modules(f) if m in scripts]
    assert found == []


def test_the_library_takes_no_command_line():
    """No function under sfron/ has a parameter called args (an argparse namespace), nor passes **kwargs through."""
    offending = [(os.path.relpath(f, ROOT), name) for f in glob.glob(os.path.join(ROOT, "sfron", "*.py"))
                 for name, params in functions(f) if "args" in params or any(p.startswith("**") for p in params)]
    assert offending == []


def test_the_suite_carries_its_reference_outputs():
    """A clone of the repository alone runs the suite: the official-code reference file is under tests/."""
    import conftest
    assert os.path.commonpath([conftest.FIXTURE, ROOT]) == ROOT and os.path.isfile(conftest.FIXTURE)
    for path in glob.glob(os.path.join(ROOT, "tests", "*.py")):
        assert "shared" + os.sep not in open(path).read().replace("/", os.sep), path


def test_a_run_recorded_without_a_newer_setting_is_refused_with_the_reason():
    from forget import settings_sections
    from sfron.resume import check_same_run, pinned_record
    from sfron.unlearn import UnlearnSettings
    current = pinned_record(settings_sections(UnlearnSettings.from_fields({"forget_class": 0, "lr": 1e-4})))
    older = dict(current, remain={k: v for k, v in current["remain"].items() if k != "remain_loss"})
    with pytest.raises(UserError, match="records no --remain-loss .*earlier version"):
        check_same_run(older, current)
    changed = dict(current, step=dict(current["step"], lr=2e-4))
    with pytest.raises(UserError, match="--lr 0.0001 differs from the resumed run's 0.0002"):
        check_same_run(changed, current)
    check_same_run(current, current)
