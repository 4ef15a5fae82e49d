"""The shell sessions the docs show (a ``` block whose first line is `$ disttrain ...`) run as shown: each
command's output, line by line (`...` stands for any lines), and its exit status where `$ echo $?` follows."""
import re
import shlex
from pathlib import Path

import pytest

from disttrain.cli.main import main

REPO = Path(__file__).resolve().parents[2]
DOCS_WITH_SESSIONS = ["docs/MEMORY.md"]


def sessions(doc):
    """[(command argv, expected output lines, expected status or None)] of every shell session in `doc`."""
    found = []
    for block in re.findall(r"```\n(\$ disttrain .*?)```", (REPO / doc).read_text(), re.DOTALL):
        steps = []
        for line in block.splitlines():
            if line == "$ echo $?":
                steps[-1][2] = "status"
            elif line.startswith("$ disttrain "):
                steps.append([shlex.split(line[2:])[1:], [], None])
            elif steps[-1][2] == "status":
                steps[-1][2] = int(line)
            else:
                steps[-1][1].append(line)
        found += [tuple(step) for step in steps]
    return found


def matches(expected, got):
    """Whether `got` lines are `expected` with each "..." standing for any number of lines."""
    pattern = "\n".join(".*?" if line == "..." else re.escape(line) for line in expected)
    return re.fullmatch(pattern, "\n".join(got), re.DOTALL) is not None


@pytest.mark.parametrize("argv, expected, status", [s for doc in DOCS_WITH_SESSIONS for s in sessions(doc)],
                         ids=lambda value: " ".join(value) if isinstance(value, list) and value and
                         isinstance(value[0], str) and value[0] in ("plan", "run") else None)
def test_a_documented_session_prints_what_the_docs_show(argv, expected, status, capsys, monkeypatch):
    monkeypatch.chdir(REPO)
    code = main(argv)
    captured = capsys.readouterr()
    got = (captured.out + captured.err).strip("\n").splitlines()
    assert matches(expected, got), "\n".join(got)
    if status is not None:
        assert code == status
