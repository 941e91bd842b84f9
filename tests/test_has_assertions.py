"""A standing check: every test function asserts something.

A test without an assertion only checks that nothing raised, and says
"checked" where nothing was. Counted as assertions: `assert`, a call whose
name starts with `assert` (`np.testing.assert_allclose`, helpers such as
`assert_config_round_trip`), `pytest.raises`/`pytest.warns` and `pytest.fail`
or `pytest.skip`, and a call to a helper of the same module that asserts.
"""

import ast
import glob
import os

import pytest

TESTS = os.path.dirname(os.path.abspath(__file__))


def _call_name(node):
    func = node.func
    return func.attr if isinstance(func, ast.Attribute) else getattr(func, "id", "")


def _asserts_directly(func):
    for node in ast.walk(func):
        if isinstance(node, ast.Assert):
            return True
        if isinstance(node, ast.Call):
            name = _call_name(node)
            if name.startswith("assert") or name in ("raises", "warns", "fail", "skip", "xfail", "importorskip"):
                return True
    return False


def functions_without_assertions(source, filename="<test>"):
    """Names of the `test_*` functions in `source` with no assertion, directly or through a local helper."""
    tree = ast.parse(source, filename)
    functions = {
        node.name: node for node in ast.walk(tree) if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef))
    }
    asserting = {name for name, func in functions.items() if _asserts_directly(func)}
    # Helpers that call asserting helpers assert too: propagate to a fixed point.
    changed = True
    while changed:
        changed = False
        for name, func in functions.items():
            if name not in asserting and any(
                isinstance(node, ast.Call) and _call_name(node) in asserting for node in ast.walk(func)
            ):
                asserting.add(name)
                changed = True
    return sorted(name for name in functions if name.startswith("test_") and name not in asserting)


def test_the_checker_finds_a_test_without_assertion():
    source = """
def _check(x):
    assert x

def _indirect(x):
    _check(x)

def test_plain():
    assert 1

def test_numpy():
    np.testing.assert_allclose(1, 1)

def test_raises():
    with pytest.raises(ValueError):
        int("x")

def test_through_helpers():
    _indirect(1)

def test_nothing():
    value = 1 + 1
    print(value)

def test_only_calls_a_silent_helper():
    helper(1)
"""
    assert functions_without_assertions(source) == ["test_nothing", "test_only_calls_a_silent_helper"]


@pytest.mark.parametrize("path", sorted(glob.glob(os.path.join(TESTS, "test_*.py"))), ids=os.path.basename)
def test_every_test_function_asserts(path):
    with open(path) as f:
        missing = functions_without_assertions(f.read(), path)
    assert not missing, f"{os.path.basename(path)}: test functions without an assertion: {missing}"
