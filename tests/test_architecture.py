"""Import rules of the code base, checked on the source (AST) or in a fresh interpreter; no Ray, no models."""

import ast
import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "flora_ray"
TESTING = PACKAGE / "testing"


def _sources(*folders: Path) -> list[Path]:
    return sorted(p for folder in folders for p in folder.rglob("*.py") if ".venv" not in p.parts)


def _module_name(path: Path) -> str:
    parts = path.relative_to(ROOT).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _imports(path: Path) -> list[tuple[int, str, list[str]]]:
    """``(line, absolute module, imported names)`` of every import in ``path`` (relative imports resolved)."""
    tree = ast.parse(path.read_text(), filename=str(path))
    package = _module_name(path).split(".")
    if path.name != "__init__.py":
        package = package[:-1]
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found += [(node.lineno, alias.name, []) for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = package[: len(package) - node.level + 1] if node.level else []
            module = ".".join([*base, *([node.module] if node.module else [])])
            found.append((node.lineno, module, [alias.name for alias in node.names]))
    return found


def _where(path: Path, line: int) -> str:
    return f"{path.relative_to(ROOT)}:{line}"


def test_no_module_imports_a_private_name_of_another_flora_ray_module():
    offences = []
    for path in _sources(PACKAGE, ROOT / "experiments"):
        own = _module_name(path)
        for line, module, names in _imports(path):
            if module.split(".")[0] != "flora_ray" or module == own:
                continue
            private = [n for n in names if n.startswith("_") and not (n.startswith("__") and n.endswith("__"))]
            if private:
                offences.append(f"{_where(path, line)}: from {module} import {', '.join(private)}")
    assert not offences, "private names imported across modules (make them public or move the code):\n" + "\n".join(
        offences
    )


def test_library_modules_do_not_import_the_testing_package():
    offences = []
    for path in _sources(PACKAGE):
        if TESTING in path.parents:
            continue
        for line, module, names in _imports(path):
            targets = [module] + [f"{module}.{n}" for n in names]
            if any(t == "flora_ray.testing" or t.startswith("flora_ray.testing.") for t in targets):
                offences.append(f"{_where(path, line)}: imports {module} {names or ''}".rstrip())
    assert not offences, "flora_ray.testing is for tests and benchmarks only:\n" + "\n".join(offences)


def _heavy_modules_after(statements: list[str], heavy: tuple[str, ...]) -> list[str]:
    """The top-level packages of ``heavy`` that a fresh interpreter has imported after running ``statements``."""
    script = "\n".join(
        ["import sys", *statements, f"print(sorted({{m.split('.')[0] for m in sys.modules}} & {set(heavy)!r}))"]
    )
    result = subprocess.run([sys.executable, "-c", script], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr[-3000:]
    return json.loads(result.stdout.strip().splitlines()[-1])


def test_parsing_a_config_imports_no_torch():
    statements = ["import flora_ray.config", "flora_ray.config.load_config('experiments/quickstart.yaml')",
                  "assert 'flora_ray.data' not in sys.modules"]  # fmt: skip
    assert _heavy_modules_after(statements, ("torch", "timm", "ray", "numpy")) == []


def test_the_command_line_parser_and_the_run_api_import_no_torch_timm_or_ray():
    """``flora-ray --help`` (building the parser, with the stage table) and opening the API stay light: the stages'
    modules are imported when a stage runs (``stages.lazy``), torch where tensors are read or written."""
    statements = ["import flora_ray.cli, flora_ray.api", "flora_ray.cli.build_parser()"]
    assert _heavy_modules_after(statements, ("torch", "timm", "ray")) == []


def test_flora_ray_config_checks_the_model_without_torch_or_timm():
    """``flora-ray config`` (and a bad model name it refuses) reads timm's registry from its source: no torch."""
    statements = [
        "import contextlib, io, flora_ray.cli",
        "with contextlib.redirect_stdout(io.StringIO()): flora_ray.cli.main(['config', 'experiments/quickstart.yaml'])",
        "from flora_ray.core.names import check_model_name, timm_model_names",
        "assert 'deit_small_patch16_224' in timm_model_names()",
    ]
    assert _heavy_modules_after(statements, ("torch", "timm", "ray")) == []


def test_timms_registry_read_from_its_source_is_timms_own():
    """The source scan (``flora_ray.core.names``) against ``timm.list_models()`` in a fresh interpreter."""
    script = (
        "import json; from flora_ray.core.names import timm_model_names; scanned = sorted(timm_model_names()); "
        "import timm; print(json.dumps([scanned, sorted(timm.list_models())]))"
    )
    result = subprocess.run([sys.executable, "-c", script], cwd=ROOT, capture_output=True, text=True, timeout=120)
    scanned, listed = json.loads(result.stdout.strip().splitlines()[-1])
    assert len(listed) > 1000 and scanned == listed


def test_collectives_are_only_issued_by_the_cross_worker_check():
    """The one collective flora-ray issues itself (others are Ray Train's and DDP's) is in training/callbacks.py,
    where the device rule is tested; a new one elsewhere must get the same care."""
    calls = []
    for path in Path("flora_ray").rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            collective = isinstance(node, ast.Attribute) and node.attr in {"all_reduce", "broadcast", "all_gather"}
            if collective and isinstance(node.value, ast.Name) and node.value.id in {"dist", "distributed"}:
                calls.append(str(path))
    assert set(calls) == {str(Path("flora_ray/training/callbacks.py"))}


def _runtime_imports(path: Path) -> list[tuple[int, str, list[str]]]:
    """``_imports(path)`` less those under ``if TYPE_CHECKING:`` (never executed)."""
    tree = ast.parse(path.read_text(), filename=str(path))
    typing_only = {
        getattr(node, "lineno", None)
        for branch in ast.walk(tree)
        if isinstance(branch, ast.If) and "TYPE_CHECKING" in ast.unparse(branch.test)
        for statement in branch.body
        for node in ast.walk(statement)
    }
    return [found for found in _imports(path) if found[0] not in typing_only]


def _import_graph() -> dict[str, set[str]]:
    """Module -> the flora_ray modules it imports at run time (at the top or inside functions)."""
    modules = {_module_name(p): p for p in _sources(PACKAGE)}

    def target(module: str, names: list[str]) -> str:
        for name in names:  # ``from package import module``
            if f"{module}.{name}" in modules:
                return f"{module}.{name}"
        while module not in modules:  # ``from module import name`` (or a submodule's parent)
            module = module.rpartition(".")[0]
        return module

    return {
        name: {target(m, names) for _, m, names in _runtime_imports(path) if m.split(".")[0] == "flora_ray"} - {name}
        for name, path in modules.items()
    }


def _cycle(graph: dict[str, set[str]]) -> list[str]:
    import graphlib

    try:
        graphlib.TopologicalSorter(graph).prepare()
    except graphlib.CycleError as exc:
        return exc.args[1]
    return []


def test_no_import_loops_between_modules_or_packages():
    """Modules import each other in one direction only, and so do the packages (``core``, ``stages``, ...): the
    layering stays a layering. ``flora_ray/__init__.py`` is a lazy facade (its imports are ``TYPE_CHECKING`` only)."""
    graph = _import_graph()
    assert not _cycle(graph), "an import loop between modules: " + " -> ".join(_cycle(graph))
    package = {name: ".".join(name.split(".")[:2]) for name in graph}
    packages: dict[str, set[str]] = {}
    for name, targets in graph.items():
        packages.setdefault(package[name], set()).update(package[t] for t in targets if package[t] != package[name])
    assert not _cycle(packages), "an import loop between packages: " + " -> ".join(_cycle(packages))


BENCHMARKS = ROOT / "experiments" / "benchmarks"


def test_benchmarks_import_the_harness_not_each_other():
    """A benchmark script imports only the harness modules (``harness*.py``) from its folder, never another
    benchmark, and no module there edits ``sys.path`` (a script's own folder is on it when run as a script; pytest
    gets it from pyproject's ``pythonpath``)."""
    local = {p.stem for p in BENCHMARKS.glob("*.py")}
    offences = []
    for path in sorted(BENCHMARKS.glob("*.py")):
        for line, module, _ in _imports(path):
            name = module.split(".")[0]
            if name in local and not name.startswith("harness"):
                offences.append(f"{_where(path, line)}: imports the benchmark {name}")
        if "sys.path" in path.read_text():
            offences.append(f"{path.relative_to(ROOT)}: edits sys.path")
    assert not offences, "benchmarks share code through harness*.py only:\n" + "\n".join(offences)
