"""benchmarks/gpu_checks.sh, the one prepared run a lent GPU machine gets, reaches every gpu-marked test: it
lists the modules to collect (GPU_TESTS), so a module with gpu-marked tests left off that list would never
run on a GPU. This check itself needs no GPU."""
import pathlib
import re

ROOT = pathlib.Path(__file__).resolve().parents[2]
SCRIPT = ROOT / "benchmarks" / "gpu_checks.sh"
GPU_MARK = re.compile(r"\bmark\.gpu\b")


def _listed_paths():
    found = re.search(r"GPU_TESTS=\(([^)]*)\)", SCRIPT.read_text())
    assert found, "benchmarks/gpu_checks.sh has no GPU_TESTS=(...) list"
    return [ROOT / path for path in found.group(1).split()]


def _covered(module, listed):
    target = module.parent if module.name == "conftest.py" else module   # a conftest marks its whole folder
    return any(target == path or path in target.parents for path in listed)


def test_the_listed_paths_exist():
    missing = [str(path.relative_to(ROOT)) for path in _listed_paths() if not path.exists()]
    assert not missing, f"benchmarks/gpu_checks.sh lists test paths that do not exist: {missing}"


def test_every_module_with_gpu_tests_is_listed():
    listed = _listed_paths()
    this = pathlib.Path(__file__).resolve()
    marked = [path for path in sorted((ROOT / "tests").rglob("*.py"))
              if path.resolve() != this and GPU_MARK.search(path.read_text())]
    assert marked, "no gpu-marked test found: the search is wrong"
    missing = [str(path.relative_to(ROOT)) for path in marked if not _covered(path, listed)]
    assert not missing, f"gpu-marked tests that benchmarks/gpu_checks.sh does not run: {missing}"
