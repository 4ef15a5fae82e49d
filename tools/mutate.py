"""Mutation testing of the core modules: plant one small bug at a time and check that the module's tests fail.

    python tools/mutate.py                                 # every module in MODULES (hours)
    python tools/mutate.py parallel/buckets.py --sample 40 # 40 of its mutants, drawn with --seed
    python tools/mutate.py autograd/ops --list             # the mutants, without running anything
    python tools/mutate.py parallel/buckets.py --survivors # run again only what survived last time

Each mutant changes one spot of the source: an arithmetic, comparison or boolean operator, a number
(n -> n + 1), True/False, a `not` or unary minus dropped, break <-> continue, or a call or augmented
assignment statement removed. Strings, error messages (raise statements, f-strings), asserts, logging
calls and lines marked `# pragma: no mutate` are left alone. A mutant is written into a copy of the
repository (the tracked and untracked, not ignored files), where the module's test steps run one after
another with `pytest -x` (MPI steps under mpiexec); the first failing step kills it, a step running past
its time-out (TIMEOUT_FACTOR x its time on the real code + TIMEOUT_SLACK seconds) kills it too, and a
mutant all steps pass survives. Results go to OUT/<module>.jsonl as they come (an interrupted run goes on
where it stopped) and OUT/REPORT.md sums them up with every survivor's diff.

Why not mutmut: it runs the tests in processes forked from one that imported them, which MPI, ZMQ and
the progress threads do not survive, and it cannot run the tests that need mpiexec.
"""
import argparse
import ast
import glob
import json
import os
import random
import shutil
import subprocess
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PYTEST = ("-m", "pytest", "-x", "-q", "-p", "no:cacheprovider")
TIMEOUT_FACTOR, TIMEOUT_SLACK = 4.0, 60.0
SKIPPED_CALLS = {"log", "print", "warn", "debug", "info", "write_line"}   # output only: removing them changes no result


def pytest(*args):
    return ("pytest", 1, args)


def mpi(ranks, *args):
    return ("mpi", ranks, args)


# every test that runs the Trainer: one process, each MPI mode, a parameter-server worker
TRAINING_LOOP_STEPS = [pytest("tests/train", "tests/cli"),
                       mpi(2, "tests/mpi/test_mpi_trainer.py", "tests/mpi/test_fit_modes.py",
                           "tests/mpi/test_pipeline_trainer.py", "tests/mpi/test_transformer_modes.py"),
                       pytest("tests/paramserver/test_sync_equals_local.py", "tests/paramserver/test_transformer_worker.py")]

# the parameter server's in-process tests first (seconds); then the rest: clusters of processes, the
# ten-second partition, the CLI
PARAMSERVER_QUICK = ["tests/paramserver/test_protocol.py", "tests/paramserver/test_resend_exactly_once.py",
                     "tests/paramserver/test_large_parts.py", "tests/paramserver/test_snapshot.py",
                     "tests/paramserver/test_consistency_modes.py", "tests/paramserver/test_sync_equals_local.py",
                     "tests/paramserver/test_worker_checks.py"]
PARAMSERVER_STEPS = [pytest(*PARAMSERVER_QUICK),
                     pytest("tests/paramserver", *(f"--ignore={path}" for path in PARAMSERVER_QUICK))]

# module -> (source globs, test steps): the tests that exercise the module, the quickest killers first; a
# mutant stops at the first failing step, so only the survivors of the early steps pay for the slow last ones
MODULES = {
    "autograd/ops": (["disttrain/autograd/ops/*.py"],
                     [pytest("tests/autograd", "tests/train/test_lstm_layer.py"),
                      pytest("tests/nn/test_nn_functional.py", "tests/nn/test_layers_vs_torch.py")]),
    "parallel/buckets.py": (["disttrain/parallel/buckets.py"],
                            [pytest("tests/parallel/test_parallel_units.py", "tests/parallel/test_reducer_one_rank.py"),
                             mpi(2, "tests/mpi/test_data_parallel.py", "tests/mpi/test_checkpointed_data_parallel.py",
                                 "tests/mpi/test_reducer_modes.py", "tests/mpi/test_bucket_refill.py"),
                             mpi(4, "tests/mpi/test_data_parallel.py")]),
    "parallel/pipeline/pipeline_mode.py": (["disttrain/parallel/pipeline/pipeline_mode.py"],
                                           [pytest("tests/parallel/test_pipeline_mode_layout.py"),
                                            mpi(2, "tests/mpi/test_pipeline_replica_mean.py",
                                                "tests/mpi/test_pipeline_clip.py", "tests/mpi/test_pipeline_trainer.py",
                                                "tests/mpi/test_transformer_modes.py", "tests/mpi/test_fit_modes.py"),
                                            pytest("tests/parallel/test_pipeline_jobs.py"),
                                            mpi(4, "tests/mpi/test_pipeline_replica_mean.py",
                                                "tests/mpi/test_pipeline_trainer.py")]),
    "parallel/pipeline/schedule.py": (["disttrain/parallel/pipeline/schedule.py"],
                                      [pytest("tests/parallel/test_pipeline_schedule.py",
                                              "tests/parallel/test_pipeline_schedule_edges.py"),
                                       mpi(2, "tests/mpi/test_pipeline.py", "tests/mpi/test_pipeline_trainer.py"),
                                       mpi(4, "tests/mpi/test_pipeline.py")]),
    "parallel/sharded_optimizer.py": (["disttrain/parallel/sharded_optimizer.py"],
                                      [pytest("tests/parallel/test_sharded_optimizer_units.py"),
                                       mpi(2, "tests/mpi/test_shard_collectives.py", "tests/mpi/test_sharded_optimizer.py",
                                           "tests/mpi/test_sharded_trainer.py")]),
    "paramserver/server.py": (["disttrain/paramserver/server.py"], PARAMSERVER_STEPS),
    "paramserver/worker.py": (["disttrain/paramserver/worker.py"], PARAMSERVER_STEPS),
    "train/loop.py": (["disttrain/train/loop.py"], TRAINING_LOOP_STEPS),
    "train/mode.py": (["disttrain/train/mode.py"], TRAINING_LOOP_STEPS),
    "train/saving.py": (["disttrain/train/saving.py"],
                        [pytest("tests/train/test_checkpoint.py", "tests/train/test_resume.py",
                                "tests/train/test_nonfinite.py", "tests/cli", "tests/paramserver/test_snapshot.py"),
                         mpi(2, "tests/mpi/test_mpi_trainer.py", "tests/mpi/test_pipeline_trainer.py")]),
}


# a file's own tests, run first for its mutants (most die there, in a few seconds)
FOCUS = {
    "disttrain/autograd/ops/conv.py": pytest("tests/autograd/test_gradcheck_nn_conv.py"),
    "disttrain/autograd/ops/elementwise.py": pytest("tests/autograd/test_gradcheck_elementwise.py"),
    "disttrain/autograd/ops/linalg.py": pytest("tests/autograd/test_gradcheck_matmul.py"),
    "disttrain/autograd/ops/lstm.py": pytest("tests/train/test_lstm_layer.py"),
    "disttrain/autograd/ops/nn.py": pytest("tests/autograd/test_gradcheck_nn_conv.py"),
    "disttrain/autograd/ops/reduce.py": pytest("tests/autograd/test_gradcheck_reduce_shape.py"),
    "disttrain/autograd/ops/shape.py": pytest("tests/autograd/test_gradcheck_reduce_shape.py"),
}


# ---------------------------------------------------------------------------------------------- mutants

@dataclass(frozen=True)
class Mutant:
    path: str           # relative to the repository root
    line: int           # 1-based, where the change starts
    col: int
    start: int          # character offsets of the replaced text in the file
    stop: int
    old: str
    new: str
    kind: str

    @property
    def id(self):
        return f"{self.path}:{self.line}:{self.col}:{self.kind}:{self.new}"


BINARY = {ast.Add: ("+", "-"), ast.Sub: ("-", "+"), ast.Mult: ("*", "/"), ast.Div: ("/", "*"),
          ast.FloorDiv: ("//", "/"), ast.Mod: ("%", "//"), ast.Pow: ("**", "*"), ast.BitOr: ("|", "&"),
          ast.BitAnd: ("&", "|")}
COMPARE = {ast.Lt: ("<", "<="), ast.LtE: ("<=", "<"), ast.Gt: (">", ">="), ast.GtE: (">=", ">"),
           ast.Eq: ("==", "!="), ast.NotEq: ("!=", "=="), ast.Is: ("is", "is not"), ast.IsNot: ("is not", "is"),
           ast.In: ("in", "not in"), ast.NotIn: ("not in", "in")}


class _Finder(ast.NodeVisitor):
    """Collects the mutants of one file."""

    def __init__(self, path, text):
        self.path, self.text = path, text
        self.offsets = [0]
        for line in text.splitlines(keepends=True):
            self.offsets.append(self.offsets[-1] + len(line))
        self.lines = text.splitlines()
        self.found = []

    def at(self, line, col):
        return self.offsets[line - 1] + len(self.lines[line - 1].encode()[:col].decode())

    def span(self, node):
        return self.at(node.lineno, node.col_offset), self.at(node.end_lineno, node.end_col_offset)

    def add(self, start, stop, new, kind):
        line = self.text.count("\n", 0, start) + 1
        if "pragma: no mutate" in self.lines[line - 1]:
            return
        col = start - self.offsets[line - 1]
        self.found.append(Mutant(self.path, line, col, start, stop, self.text[start:stop], new, kind))

    def operator_between(self, left, right, symbol, new, kind):
        """Replace the operator `symbol` that stands between two nodes (skipping brackets and spaces)."""
        start, stop = self.span(left)[1], self.span(right)[0]
        gap = self.text[start:stop]
        at = gap.find(symbol)
        if at >= 0 and gap.count(symbol) == 1 and gap.replace(symbol, "").strip(" ()\n\\") == "":
            self.add(start + at, start + at + len(symbol), new, kind)

    # nodes whose insides are not mutated
    def visit_JoinedStr(self, node):
        pass

    def visit_Raise(self, node):
        pass

    def visit_Assert(self, node):
        pass

    def visit_Expr(self, node):
        value = node.value
        if isinstance(value, ast.Constant):
            return                                          # a docstring
        if isinstance(value, ast.Call) and _call_name(value) not in SKIPPED_CALLS:
            self.add(*self.span(node), "pass", "remove call")
        self.generic_visit(node)

    def visit_Assign(self, node):
        if any(isinstance(t, ast.Name) and t.id == "__all__" for t in node.targets):
            return
        self.generic_visit(node)

    def visit_AugAssign(self, node):
        op = BINARY.get(type(node.op))
        if op:
            self.operator_between(node.target, node.value, op[0] + "=", op[1] + "=", "augmented assignment")
        self.add(*self.span(node), "pass", "remove augmented assignment")
        self.generic_visit(node)

    def visit_BinOp(self, node):
        op = BINARY.get(type(node.op))
        if op:
            self.operator_between(node.left, node.right, op[0], op[1], "arithmetic")
        self.generic_visit(node)

    def visit_Compare(self, node):
        left = node.left
        for op, right in zip(node.ops, node.comparators):
            old, new = COMPARE[type(op)]
            self.operator_between(left, right, old, new, "comparison")
            left = right
        self.generic_visit(node)

    def visit_BoolOp(self, node):
        old, new = ("and", "or") if isinstance(node.op, ast.And) else ("or", "and")
        for left, right in zip(node.values, node.values[1:]):
            self.operator_between(left, right, old, new, "boolean")
        self.generic_visit(node)

    def visit_UnaryOp(self, node):
        if isinstance(node.op, (ast.Not, ast.USub)):
            start, stop = self.span(node)
            self.add(start, stop, self.text[slice(*self.span(node.operand))], "drop " + type(node.op).__name__)
        self.generic_visit(node)

    def visit_Constant(self, node):
        value = node.value
        if isinstance(value, bool):
            self.add(*self.span(node), str(not value), "boolean constant")
        elif isinstance(value, (int, float)):
            self.add(*self.span(node), repr(value + 1), "number")

    def visit_Break(self, node):
        self.add(*self.span(node), "continue", "break -> continue")

    def visit_Continue(self, node):
        self.add(*self.span(node), "break", "continue -> break")


def _call_name(call):
    func = call.func
    return func.attr if isinstance(func, ast.Attribute) else getattr(func, "id", None)


def mutants_of(path):
    """Every mutant of the file at `path` (relative to ROOT) that still parses."""
    text = (ROOT / path).read_text()
    finder = _Finder(path, text)
    finder.visit(ast.parse(text))
    out = []
    for m in finder.found:
        try:
            ast.parse(apply(text, m))
        except SyntaxError:
            continue
        out.append(m)
    return out


def apply(text, mutant):
    return text[:mutant.start] + mutant.new + text[mutant.stop:]


# ---------------------------------------------------------------------------------------------- running

def make_workspace(out):
    """A copy of the repository's tracked and untracked (not ignored) files under out/workspace."""
    workspace = out / f"workspace-{os.getpid()}"           # one per run: runs on other modules may share `out`
    files = subprocess.run(["git", "ls-files", "-co", "--exclude-standard", "-z"], cwd=ROOT, check=True,
                           capture_output=True).stdout.decode().split("\0")
    for name in filter(None, files):
        if (ROOT / name).is_file():                     # (a deleted file is still listed until committed)
            (workspace / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(ROOT / name, workspace / name)
    env = dict(os.environ, PYTHONPATH=str(workspace))
    env.pop("DISTTRAIN_SKIP_LOG", None)
    where = subprocess.run([sys.executable, "-c", "import disttrain; print(disttrain.__file__)"], cwd=workspace,
                           env=env, capture_output=True, text=True, check=True).stdout.strip()
    if not Path(where).is_relative_to(workspace):
        sys.exit(f"mutate: the copy imports disttrain from {where}, not from {workspace}")
    return workspace, env


def command(step):
    kind, ranks, args = step
    if kind == "mpi":
        mpiexec = shutil.which("mpiexec", path=str(Path(sys.executable).parent)) or "mpiexec"
        return [mpiexec, "-n", str(ranks), sys.executable, *PYTEST, "--with-mpi", *args]
    return [sys.executable, *PYTEST, *args]


def run_step(step, workspace, env, timeout):
    """(passed, seconds, tail of the output); passed is None on a time-out."""
    started = time.monotonic()
    proc = subprocess.Popen(command(step), cwd=workspace, env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, start_new_session=True)
    try:
        output, _ = proc.communicate(timeout=timeout)
        return proc.returncode == 0, time.monotonic() - started, output[-2000:]
    except subprocess.TimeoutExpired:
        proc.terminate()                            # mpiexec passes it on to its ranks
        try:
            proc.communicate(timeout=30)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, 9)
            proc.communicate()
        return None, time.monotonic() - started, ""


def describe_step(step):
    kind, ranks, args = step
    return (f"mpiexec -n {ranks} " if kind == "mpi" else "") + "pytest " + " ".join(args)


def baseline(steps, workspace, env):
    """Seconds each step takes on the real code; exits when one fails there."""
    times = []
    for step in steps:
        passed, seconds, output = run_step(step, workspace, env, timeout=3600)
        if not passed:
            sys.exit(f"mutate: `{describe_step(step)}` fails on the unmutated code:\n{output}")
        times.append(seconds)
    return times


def test_mutant(mutant, steps, times, workspace, env):
    target = workspace / mutant.path
    original = target.read_text()
    target.write_text(apply(original, mutant))
    try:
        for step, base in zip(steps, times):
            passed, seconds, _ = run_step(step, workspace, env, TIMEOUT_FACTOR * base + TIMEOUT_SLACK)
            if passed is None:
                return "timeout", describe_step(step), seconds
            if not passed:
                return "killed", describe_step(step), seconds
        return "survived", None, None
    finally:
        target.write_text(original)


# ---------------------------------------------------------------------------------------------- results

def slug(module):
    return module.replace("/", "_").replace(".py", "")


def load(path):
    if not path.exists():
        return {}
    with open(path) as f:
        return {r["id"]: r for r in map(json.loads, filter(str.strip, f))}


def save(path, results):
    with open(path, "w") as f:
        for r in results.values():
            f.write(json.dumps(r) + "\n")


def report(out, modules):
    """OUT/REPORT.md: the score of every module with results in `out`, and every survivor."""
    lines = ["# Mutation testing report", "", "Generated by tools/mutate.py; see docs/TESTING.md.", "",
             "| module | mutants | killed | timeout | survived | score |", "| --- | ---: | ---: | ---: | ---: | ---: |"]
    survivors = []
    for module in modules:
        results = load(out / f"{slug(module)}.jsonl")
        if not results:
            continue
        status = [r["status"] for r in results.values()]
        n, killed, timeout, alive = len(status), status.count("killed"), status.count("timeout"), status.count("survived")
        lines.append(f"| {module} | {n} | {killed} | {timeout} | {alive} | {(killed + timeout) / n:.0%} |")
        for r in sorted(results.values(), key=lambda r: (r["path"], r["line"], r["col"])):
            if r["status"] == "survived":
                survivors.append(f"- `{r['path']}:{r['line']}` {r['kind']}: `{r['old'].strip()}` -> "
                                 f"`{r['new']}`  \n  `{r['source'].strip()}`")
    lines += ["", "## Survivors", ""] + (survivors or ["none"])
    (out / "REPORT.md").write_text("\n".join(lines) + "\n")
    return out / "REPORT.md"


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("modules", nargs="*", help=f"default: all of {', '.join(MODULES)}")
    parser.add_argument("--out", type=Path, default=ROOT / "runs" / "mutation")
    parser.add_argument("--sample", type=int, help="test this many mutants per module, drawn at random")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--list", action="store_true", help="print the mutants and stop")
    parser.add_argument("--survivors", action="store_true", help="run again only the mutants that survived")
    args = parser.parse_args(argv)
    modules = args.modules or list(MODULES)
    unknown = [m for m in modules if m not in MODULES]
    if unknown:
        parser.error(f"unknown module(s) {unknown}; known: {', '.join(MODULES)}")
    out = args.out.resolve()
    out.mkdir(parents=True, exist_ok=True)
    workspace = env = None
    times = {}                                              # step -> seconds on the real code
    for module in modules:
        globs, steps = MODULES[module]
        paths = sorted({str(Path(p).relative_to(ROOT)) for g in globs for p in glob.glob(str(ROOT / g))})
        mutants = [m for p in paths for m in mutants_of(p)]
        total = len(mutants)
        if args.sample is not None and args.sample < total:
            mutants = sorted(random.Random(args.seed).sample(mutants, args.sample), key=lambda m: (m.path, m.start))
        if args.list:
            for m in mutants:
                print(f"{m.path}:{m.line}:{m.col} {m.kind}: {m.old.strip()!r} -> {m.new!r}")
            print(f"{module}: {len(mutants)} of {total} mutants")
            continue
        results_path = out / f"{slug(module)}.jsonl"
        results = load(results_path)
        if args.survivors:
            mutants = [m for m in mutants if results.get(m.id, {}).get("status") == "survived"]
        else:
            mutants = [m for m in mutants if m.id not in results]
        if workspace is None:
            workspace, env = make_workspace(out)
        print(f"{module}: {len(mutants)} mutants to test ({total} in all); baseline ...", flush=True)
        all_steps = list(dict.fromkeys([FOCUS[p] for p in paths if p in FOCUS] + steps))
        new_steps = [s for s in all_steps if s not in times]     # modules sharing steps measure them once
        times.update(zip(new_steps, baseline(new_steps, workspace, env)))
        print(f"{module}: baseline {' + '.join(f'{times[s]:.0f}' for s in all_steps)} s", flush=True)
        for i, m in enumerate(mutants, 1):
            mine = list(dict.fromkeys(([FOCUS[m.path]] if m.path in FOCUS else []) + steps))
            status, step, seconds = test_mutant(m, mine, [times[s] for s in mine], workspace, env)
            source = (ROOT / m.path).read_text().splitlines()[m.line - 1]
            results[m.id] = {**asdict(m), "id": m.id, "status": status, "step": step, "seconds": seconds,
                             "source": source}
            save(results_path, results)
            print(f"[{i}/{len(mutants)}] {status:8} {m.path}:{m.line} {m.kind}: {m.old.strip()!r} -> {m.new!r}",
                  flush=True)
    if workspace is not None:
        shutil.rmtree(workspace)
    if not args.list:
        print(f"report: {report(out, MODULES)}")


if __name__ == "__main__":
    main()
