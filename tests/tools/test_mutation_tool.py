"""tools/mutation_test.py generates the single-point mutants it documents (no test run here)."""
import ast
from pathlib import Path

from conftest import REPO_ROOT, load_script

mutation_test = load_script("tools/mutation_test.py", register=True)  # dataclasses look their module up

SOURCE = '''
def f(a, b):
    """A docstring with 1 + 2 is not mutated."""
    if a < b:
        raise ValueError(1 + 2)
    return g(a, b) * 2.5
'''


def test_mutants_of_a_small_function():
    mutants = mutation_test.generate_mutants(SOURCE)
    kinds = sorted(m.kind for m, _ in mutants)
    assert kinds == ["argswap", "binop", "compare", "const"]  # nothing from the docstring or the raise
    by_kind = {m.kind: source for m, source in mutants}
    assert "a <= b" in by_kind["compare"]
    assert "g(a, b) / 2.5" in by_kind["binop"]
    assert "g(a, b) * 5.0" in by_kind["const"]
    assert "g(b, a) * 2.5" in by_kind["argswap"]
    for _, source in mutants:
        ast.parse(source)
        assert "ValueError(1 + 2)" in source


def test_every_target_file_exists_and_has_mutants():
    for name, (path, pytest_args) in mutation_test.TARGETS.items():
        assert path.exists(), name
        assert pytest_args and all(Path(REPO_ROOT, a.split("::")[0]).exists()
                                   for a in pytest_args if a.startswith("tests/"))
