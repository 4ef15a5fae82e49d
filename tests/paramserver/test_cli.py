"""`disttrain ps-*` through the main entry point, and the [ps] section of job specs."""
import json

import pytest

from disttrain.cli.main import main
from disttrain.train.jobspec import JobSpecError, describe_schema, loads_job


def test_ps_keys_and_ps_cluster_through_disttrain_main(ps_job, tmp_path, capfd):
    assert main(["ps-keys", str(tmp_path / "keys"), "--workers", "2", "--client", "admin"]) == 0
    assert sorted(p.name for p in (tmp_path / "keys" / "clients").iterdir()) == ["admin.key", "worker-0.key",
                                                                                 "worker-1.key"]
    _, job = ps_job()
    out = tmp_path / "run"
    status = main(["ps-cluster", str(job), "--servers", "1", "--workers", "1", "--insecure", "--out", str(out),
                   "--set", "train.max_steps=30"])
    assert status == 0
    assert "final: valid ppl" in capfd.readouterr().out          # worker 0 prints to the terminal
    resolved = (out / "job.toml").read_text()
    assert 'mode = "ps"' in resolved and "workers = 1" in resolved and "max_steps = 30" in resolved
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert rows[-1]["split"] == "test" and rows[-1]["step"] == 30


def test_unusable_jobs_and_options_exit_2(tmp_path, capsys):
    assert main(["ps-cluster", str(tmp_path / "missing.toml"), "--insecure"]) == 2
    assert "no such job file" in capsys.readouterr().err
    job = tmp_path / "job.toml"
    job.write_text('[ps]\nconsistency = "bsp"\n')
    assert main(["ps-server", str(job), "--index", "0", "--insecure"]) == 2
    assert '[ps] consistency = "bsp"' in capsys.readouterr().err


def test_ps_section_defaults_and_errors():
    spec = loads_job('[parallel]\nmode = "ps"\n[ps]\nservers = 3\nconsistency = "ssp"\nstaleness = 0\n')
    assert (spec.ps.servers, spec.ps.workers, spec.ps.consistency, spec.ps.staleness) == (3, 2, "ssp", 0)
    assert "[ps] heartbeat_timeout" in describe_schema()
    with pytest.raises(JobSpecError) as info:
        loads_job("[ps]\nservers = 0\nheartbeat_timeout = -1\nstaleness = true\nwokers = 2\n")
    message = str(info.value)
    for part in ("[ps] servers = 0", "[ps] heartbeat_timeout = -1", "[ps] staleness = true",
                 '(did you mean "workers"?)'):
        assert part in message
