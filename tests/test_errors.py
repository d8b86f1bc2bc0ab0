"""One error base: every error the user can fix subclasses EdgeclrError, and the CLI turns it into one line and exit 2."""

import ast
import inspect
from pathlib import Path

import pytest
from helpers import run

from edgeclr import errors

ROOT = Path(__file__).resolve().parent.parent


def test_every_error_class_defined_in_edgeclr_subclasses_the_base():
    defined = []
    for p in (ROOT / "edgeclr").rglob("*.py"):
        for n in ast.walk(ast.parse(p.read_text())):
            if isinstance(n, ast.ClassDef) and (n.name.endswith("Error") or n.name in ("NonFiniteLoss", "WorkersFailed")):
                defined.append((p, n.name))
    assert len(defined) >= 10
    for p, name in defined:
        mod = ".".join(p.relative_to(ROOT).with_suffix("").parts).removesuffix(".__init__")
        cls = getattr(__import__(mod, fromlist=[name]), name)
        assert issubclass(cls, errors.EdgeclrError), f"{mod}.{name}"


@pytest.mark.parametrize("name", [n for n, c in inspect.getmembers(errors, inspect.isclass) if issubclass(c, errors.EdgeclrError)])
def test_each_error_keeps_a_builtin_base_for_callers_that_catch_those(name):
    cls = getattr(errors, name)
    assert name == "EdgeclrError" or issubclass(cls, (ValueError, RuntimeError, OSError))


def test_the_cli_prints_a_user_error_as_one_line_and_exits_2(tmp_path):
    r = run(["eval", str(tmp_path / "no-such-run")], ok=False)
    assert r.exit_code == 2
    assert r.output.startswith("error: ") and len(r.output.strip().splitlines()) == 1 and "does not exist" in r.output
