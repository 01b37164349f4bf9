"""The package's import graph (every import, function-level ones included): no cycle between modules, none between
the packages at any level, and the `import-linter` contracts of setup.cfg (layers core -> tools -> applications,
the core's dependencies) kept."""

import subprocess
import sys
from pathlib import Path

import grimp
import pytest


REPO_ROOT = Path(__file__).resolve().parents[1]
PACKAGE = "hf_hierseg"


@pytest.fixture(scope="module")
def graph():
    return grimp.build_graph(PACKAGE, include_external_packages=False)


def strongly_connected_components(edges):
    """Tarjan's algorithm, iterative: the components of the directed graph `{node: set of successors}` that hold a
    cycle (more than one node, or a node importing itself), each as a sorted list."""
    nodes = sorted(set(edges) | {target for targets in edges.values() for target in targets})
    index, lowlink, on_stack, stack, cycles = {}, {}, set(), [], []
    for root in nodes:
        if root in index:
            continue
        work = [(root, iter(sorted(edges.get(root, ()))))]
        index[root] = lowlink[root] = len(index)
        stack.append(root)
        on_stack.add(root)
        while work:
            node, successors = work[-1]
            for successor in successors:
                if successor not in index:
                    index[successor] = lowlink[successor] = len(index)
                    stack.append(successor)
                    on_stack.add(successor)
                    work.append((successor, iter(sorted(edges.get(successor, ())))))
                    break
                if successor in on_stack:
                    lowlink[node] = min(lowlink[node], index[successor])
            else:
                work.pop()
                if work:
                    lowlink[work[-1][0]] = min(lowlink[work[-1][0]], lowlink[node])
                if lowlink[node] == index[node]:
                    component = []
                    while True:
                        member = stack.pop()
                        on_stack.discard(member)
                        component.append(member)
                        if member == node:
                            break
                    if len(component) > 1 or node in edges.get(node, ()):
                        cycles.append(sorted(component))
    return cycles


def module_edges(graph):
    return {module: set(graph.find_modules_directly_imported_by(module)) for module in graph.modules}


def package_edges(graph, package):
    """Imports between the children of `package` (modules and sub-packages, each with everything inside it)."""
    prefix = package + "."

    def child(module):
        return prefix + module[len(prefix) :].split(".")[0] if module.startswith(prefix) else None

    edges = {}
    for importer, imported in module_edges(graph).items():
        for target in imported:
            source_child, target_child = child(importer), child(target)
            if source_child and target_child and source_child != target_child:
                edges.setdefault(source_child, set()).add(target_child)
    return edges


def test_the_cycle_finder_finds_cycles():
    assert strongly_connected_components({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]
    assert strongly_connected_components({"a": {"a"}, "b": {"a"}}) == [["a"]]
    assert strongly_connected_components({"a": {"b", "c"}, "b": {"c"}, "c": set()}) == []
    made = grimp.ImportGraph()
    for module in ("p", "p.x", "p.y", "p.q", "p.q.z"):
        made.add_module(module)
    made.add_import(importer="p.x", imported="p.q.z")
    made.add_import(importer="p.q.z", imported="p.y")
    made.add_import(importer="p.y", imported="p.x")
    assert strongly_connected_components(module_edges(made)) == [["p.q.z", "p.x", "p.y"]]
    made.remove_import(importer="p.y", imported="p.x")
    made.add_import(importer="p.y", imported="p.q")  # no module cycle, but the package p.q and p.y import each other
    assert strongly_connected_components(module_edges(made)) == []
    assert strongly_connected_components(package_edges(made, "p")) == [["p.q", "p.y"]]


def test_function_level_imports_are_in_the_graph(graph):
    # `cli.load_model` imports `loading` inside the function, `apps.demo` nothing of `cli`.
    assert graph.direct_import_exists(importer="hf_hierseg.cli", imported="hf_hierseg.loading")
    assert not graph.chain_exists(importer="hf_hierseg.apps", imported="hf_hierseg.cli", as_packages=True)


def test_no_import_cycle_between_modules(graph):
    assert strongly_connected_components(module_edges(graph)) == []


def test_no_import_cycle_between_packages_at_any_level(graph):
    packages = sorted(module for module in graph.modules if graph.find_children(module))
    assert {"hf_hierseg", "hf_hierseg.apps", "hf_hierseg.training", "hf_hierseg.evaluation"} <= set(packages)
    for package in packages:
        assert strongly_connected_components(package_edges(graph, package)) == [], package


def test_evaluation_does_not_import_training(graph):
    assert not graph.chain_exists(importer="hf_hierseg.evaluation", imported="hf_hierseg.training", as_packages=True)


@pytest.mark.slow
def test_import_linter_contracts_are_kept():
    # In a subprocess: import-linter's run leaves logging in a state that hides later tests' log records.
    command = [str(Path(sys.executable).with_name("lint-imports")), "--config", "setup.cfg", "--no-cache"]
    result = subprocess.run(command, cwd=REPO_ROOT, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "0 broken" in result.stdout
