"""`disttrain ps-*` through the main entry point, and the [ps] section of job specs."""
import json

import pytest

from disttrain.cli.main import main
from disttrain.paramserver.snapshot import read_meta
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


def test_ps_cluster_refuses_resumes_or_overwrites_an_earlier_run(ps_job, tmp_path, capfd):
    _, job = ps_job("data.batch_size=4")
    out = tmp_path / "run"
    base = ["ps-cluster", str(job), "--servers", "1", "--workers", "2", "--insecure", "--out", str(out)]
    assert main(base + ["--set", "train.max_steps=10"]) == 0
    capfd.readouterr()

    assert main(base + ["--set", "train.max_steps=10"]) == 2                  # no silent warm start
    err = capfd.readouterr().err
    assert f"{out} holds an earlier run" in err and "--resume" in err and "--overwrite" in err

    assert main(base + ["--resume", "--set", "train.max_steps=20"]) == 0      # servers and workers continue
    captured = capfd.readouterr()
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    steps = [r["step"] for r in rows if r["split"] == "train"]
    assert steps == sorted(set(steps)) and steps[-1] == 20 and rows[-1]["split"] == "test"
    assert "resuming from" in captured.err and "at step 10" in captured.err
    assert "worker 1: resuming from" in (out / "logs" / "worker-1.log").read_text()
    assert "resumed from" in (out / "logs" / "server-0.log").read_text()
    assert read_meta(out / "ps-snapshots" / "server-0.snap")["updates"] == 2 * 20     # each step applied once

    assert main(base + ["--overwrite", "--set", "train.max_steps=5"]) == 0
    assert read_meta(out / "ps-snapshots" / "server-0.snap")["updates"] == 2 * 5
    assert "resumed from" not in (out / "logs" / "server-0.log").read_text()

    assert main(["ps-cluster", str(job), "--insecure", "--out", str(tmp_path / "empty"), "--resume"]) == 2
    assert "holds no run to continue" in capfd.readouterr().err


def test_ps_cluster_refuses_a_batch_its_workers_cannot_share(ps_job, tmp_path, capfd):
    _, job = ps_job("data.batch_size=4")
    assert main(["ps-cluster", str(job), "--workers", "3", "--insecure", "--out", str(tmp_path / "run")]) == 2
    assert "batch_size = 4 cannot be shared by 3 workers" in capfd.readouterr().err
    assert not (tmp_path / "run").exists()
