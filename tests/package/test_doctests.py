"""The ``>>>`` examples in the package's docstrings run and pass: one case per module that has examples.

Examples run as ``doctest`` runs them, with ``torch`` in their namespace (docstrings use it without importing it) and
ELLIPSIS | NORMALIZE_WHITESPACE. A module, or an example, that needs an optional extra (captum, scikit-learn) is
skipped only when that extra really fails to import. The examples are counted against the ``>>>`` lines in the source
files, so a docstring the finder does not reach (or an empty package walk) fails instead of passing vacuously.
"""
import ast
import doctest
import importlib
import pkgutil
from pathlib import Path

import pytest
import torch

import lightning_xai

OPTIONS = doctest.ELLIPSIS | doctest.NORMALIZE_WHITESPACE
FINDER = doctest.DocTestFinder()
ROOT = Path(lightning_xai.__file__).parent


def _missing_extra(name):
    """The third-party module that ``name`` needs and cannot import, or None when ``name`` imports.

    Raises:
        ImportError: if the failure is inside lightning_xai itself; that is a bug, not a missing extra.
    """
    try:
        importlib.import_module(name)
    except ModuleNotFoundError as err:
        if err.name is None or err.name.split(".")[0] == "lightning_xai":
            raise
        return err.name
    return None


def _doctests(name):
    """The DocTests with examples in module ``name`` (which must import), ``torch`` added to their globals."""
    module = importlib.import_module(name)
    return [test for test in FINDER.find(module, extraglobs={"torch": torch}) if test.examples]


def _module_names():
    # walk_packages yields a subpackage even when its import fails, but cannot list its children then; _cases adds
    # those back from the source files.
    return ["lightning_xai"] + [info.name for info in pkgutil.walk_packages(lightning_xai.__path__, "lightning_xai.")]


def _prompts_in_source():
    """Module name -> number of ``>>>`` lines in its source file, read from disk without importing anything."""
    counts = {}
    for path in sorted(ROOT.rglob("*.py")):
        n = sum(line.lstrip().startswith(">>>") for line in path.read_text(encoding="utf-8").splitlines())
        if n:
            parts = path.relative_to(ROOT.parent).with_suffix("").parts
            counts[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = n
    return counts


def _cases(prompts):
    """Modules with examples. One that needs a missing extra is judged by its source, and its case reports the skip.

    Files with ``>>>`` lines that the walk did not reach (their package needs a missing extra) are cases too.
    """
    walked = _module_names()
    cases = [name for name in walked if (name in prompts if _missing_extra(name) else _doctests(name))]
    return cases + sorted(set(prompts) - set(walked))


def _imported_packages(source):
    """Top-level names of the packages an example imports (``import captum.attr`` -> ``captum``)."""
    try:
        tree = ast.parse(source)
    except SyntaxError:
        return set()  # the runner reports it
    names = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names.update(alias.name.split(".")[0] for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            names.add(node.module.split(".")[0])
    return names - {"lightning_xai"}


PROMPTS = _prompts_in_source()
CASES = _cases(PROMPTS)


@pytest.mark.parametrize("name", [pytest.param(n, id=n.split(".", 1)[-1]) for n in CASES])
def test_docstring_examples_pass(name):
    missing = _missing_extra(name)
    if missing is not None:
        pytest.skip(f"{name} needs {missing}, which does not import")
    tests = _doctests(name)
    for package in sorted(set().union(*(_imported_packages(ex.source) for t in tests for ex in t.examples))):
        pytest.importorskip(package)
    found = sum(len(t.examples) for t in tests)
    assert found == PROMPTS.get(name, 0), (f"doctest finds {found} examples in {name}, but its source has "
                                           f"{PROMPTS.get(name, 0)} `>>>` lines: a docstring is not reached")

    runner = doctest.DocTestRunner(optionflags=OPTIONS)
    report = []
    results = [runner.run(test, out=report.append) for test in tests]
    failed, attempted = sum(r.failed for r in results), sum(r.attempted for r in results)
    if failed:
        pytest.fail(f"{failed} of {attempted} examples in {name} failed:\n{''.join(report)}", pytrace=False)


def test_every_example_in_the_source_is_collected():
    assert PROMPTS, f"no `>>>` lines under {ROOT}"
    assert sorted(CASES) == sorted(PROMPTS), "the cases and the files with `>>>` lines differ"
    found = sum(len(t.examples) for name in CASES if _missing_extra(name) is None for t in _doctests(name))
    assert found > 0
