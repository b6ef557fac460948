"""Checks the package's import graph: no module of optpo_jax imports itself through others, and the top-level
package leaves training, reports and matplotlib unimported."""

import ast
import subprocess
import sys
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "optpo_jax"


def package_modules(root: Path = PACKAGE) -> dict[str, Path]:
    """Dotted module name -> file, for every module under ``root`` (a package is its __init__.py)."""
    modules = {}
    for path in sorted(root.rglob("*.py")):
        parts = path.relative_to(root.parent).with_suffix("").parts
        modules[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path
    return modules


def imported_modules(name: str, tree: ast.AST, modules: dict) -> set[str]:
    """The package's modules that module ``name`` imports anywhere in its file (functions included).

    ``from optpo_jax.a import b`` imports ``optpo_jax.a.b`` when that is a module, else ``optpo_jax.a``.
    """
    package = name if modules[name].name == "__init__.py" else name.rpartition(".")[0]
    found = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found |= {alias.name for alias in node.names}
        elif isinstance(node, ast.ImportFrom):
            if node.level:  # relative: resolved against the importing module's package
                base = package.rsplit(".", node.level - 1)[0] if node.level > 1 else package
                module = f"{base}.{node.module}" if node.module else base
            else:
                module = node.module or ""
            for alias in node.names:
                submodule = f"{module}.{alias.name}"
                found.add(submodule if submodule in modules else module)
    return {target for target in found if target in modules and target != name}


def import_graph(root: Path = PACKAGE) -> dict[str, set[str]]:
    modules = package_modules(root)
    return {name: imported_modules(name, ast.parse(path.read_text(), str(path)), modules)
            for name, path in modules.items()}


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One cycle of ``graph`` as [a, b, ..., a], or None (depth-first search, iterative)."""
    done, on_path = set(), {}
    for start in sorted(graph):
        if start in done:
            continue
        path, iterators = [start], [iter(sorted(graph[start]))]
        on_path[start] = 0
        while path:
            step = next(iterators[-1], None)
            if step is None:
                done.add(path[-1])
                del on_path[path.pop()]
                iterators.pop()
            elif step in on_path:
                return path[on_path[step]:] + [step]
            elif step not in done:
                on_path[step] = len(path)
                path.append(step)
                iterators.append(iter(sorted(graph[step])))
    return None


def test_the_import_graph_has_no_cycle():
    graph = import_graph()
    assert len(graph) > 30 and "optpo_jax.train.loop" in graph
    assert "optpo_jax.train.step" in graph["optpo_jax.train.loop"]  # edges are found
    cycle = find_cycle(graph)
    assert cycle is None, "import cycle: " + " -> ".join(cycle)


def test_a_cycle_is_found_and_named(tmp_path):
    """The check itself: a package whose modules import each other (one inside a function, one by
    ``from package import module``) is a cycle."""
    package = tmp_path / "optpo_jax"
    (package / "sub").mkdir(parents=True)
    (package / "__init__.py").write_text("")
    (package / "sub" / "__init__.py").write_text("")
    (package / "a.py").write_text("from optpo_jax.sub import b\n")
    (package / "sub" / "b.py").write_text("def f():\n    from optpo_jax import c\n")
    (package / "c.py").write_text("import optpo_jax.a\n")
    (package / "d.py").write_text("from optpo_jax.a import something\n")
    graph = import_graph(package)
    assert graph["optpo_jax.d"] == {"optpo_jax.a"}
    assert find_cycle(graph) == ["optpo_jax.a", "optpo_jax.sub.b", "optpo_jax.c", "optpo_jax.a"]
    (package / "c.py").write_text("")
    assert find_cycle(import_graph(package)) is None


def test_importing_the_package_leaves_training_reports_and_matplotlib_out():
    code = ("import sys\nimport optpo_jax\n"
            "print(sorted(name for name in sys.modules if name.split('.')[0] == 'matplotlib'\n"
            "             or name.startswith(('optpo_jax.train', 'optpo_jax.report'))))")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300, check=False,
                            cwd=PACKAGE.parent)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "[]"
