"""The layering docs/ARCHITECTURE.md states: each package imports only from the packages listed above it in the
"Layers" table, except for the references named there (and here). The order is read from the document itself, so
the table and the code cannot drift apart."""
import ast
import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "disttrain"

# (importing file, imported package): the upward references ARCHITECTURE.md names
NAMED_EXCEPTIONS = {
    ("tensor/tensor.py", "autograd"),        # Tensor methods (+, @, .sum(), backward) call autograd's ops and engine
    ("tensor/memory.py", "autograd"),        # the memory meter registers an op observer while it runs
    ("tensor/backend.py", "kernels_cpu"),    # each backend's kernel table
    ("tensor/backend.py", "kernels_cuda"),
    ("train/fit.py", "parallel"),            # fit(mode="data") looks the MPI modes up by name at call time
    ("paramserver/cli.py", "cli"),           # the ps-* sub-commands share the CLI's arguments and exit statuses
}


def layer_order():
    text = (ROOT / "docs" / "ARCHITECTURE.md").read_text()
    table = text.split("## Layers", 1)[1].split("```", 2)[1]
    return [m.group(1) for m in re.finditer(r"^disttrain/(\w+)", table, re.MULTILINE)]


def imported_packages(path):
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            names = [node.module] + [f"{node.module}.{alias.name}" for alias in node.names]
        else:
            continue
        for name in names:
            parts = name.split(".")
            if parts[0] == "disttrain" and len(parts) > 1:
                yield parts[1], node.lineno


def test_the_layers_table_lists_every_package_and_module_of_disttrain():
    listed = set(layer_order())
    present = {p.stem for p in PACKAGE.iterdir()
               if (p.is_dir() and (p / "__init__.py").exists()) or (p.suffix == ".py" and p.name != "__init__.py")}
    assert listed == present, f"in the table, not in disttrain/: {listed - present}; missing: {present - listed}"


def test_each_package_imports_only_from_the_packages_above_it():
    order = layer_order()
    rank = {name: i for i, name in enumerate(order)}
    upward = set()
    for path in sorted(PACKAGE.rglob("*.py")):
        rel = path.relative_to(PACKAGE).as_posix()
        home = rel.split("/")[0].removesuffix(".py")
        if home not in rank:
            continue                                   # disttrain/__init__.py: the public facade over them all
        for target, line in imported_packages(path):
            if target in rank and rank[target] > rank[home] and (rel, target) not in NAMED_EXCEPTIONS:
                upward.add(f"disttrain/{rel}:{line} imports disttrain.{target}")
    assert not upward, "imports from a layer listed below (docs/ARCHITECTURE.md, Layers):\n" + "\n".join(sorted(upward))


def test_every_named_exception_is_still_there():
    for rel, target in NAMED_EXCEPTIONS:
        assert target in {t for t, _ in imported_packages(PACKAGE / rel)}, f"{rel} no longer imports {target}"
