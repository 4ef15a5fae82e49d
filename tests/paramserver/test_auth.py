"""CURVE + ZAP: only listed client keys get through; everyone else gets nothing and changes nothing."""
import os
import subprocess
import sys

import numpy as np
import pytest
import zmq
import zmq.auth

from disttrain.paramserver.auth import (AuthError, ClientSecurity, ServerSecurity, check_insecure_endpoint,
                                        generate_keys, is_loopback_endpoint)
from disttrain.paramserver.protocol import encode, request
from disttrain.paramserver.sharding import Layout, ParamSpec
from disttrain.paramserver.worker import PSClient

from ps_testing import running_servers, sgd_factory

LAYOUT = Layout([ParamSpec("w", (32,), "<f4")], 1)
INITIAL = [np.arange(32, dtype="<f4")]


def join_frames(worker=1):
    return encode(request("join", 1, worker=worker, clock=0, fingerprint=LAYOUT.fingerprint))


def attempt(ctx, endpoint, setup=None, wait_ms=800):
    """Send a join (and a push) from a fresh socket; returns the reply frames or None."""
    sock = ctx.socket(zmq.DEALER)
    sock.linger = 0
    if setup is not None:
        setup(sock)
    sock.connect(endpoint)
    sock.send_multipart(join_frames())
    sock.send_multipart(encode(request("push", 2, worker=1, clock=0, keys=[0]), [np.ones(32, "<f4")]))
    got = sock.recv_multipart() if sock.poll(wait_ms) else None
    sock.close()
    return got


def test_only_listed_keys_are_served(tmp_path):
    keys = generate_keys(tmp_path / "keys", ["worker-0", "admin"])
    assert (keys / "private" / "worker-0.key_secret").stat().st_mode & 0o077 == 0
    stranger_dir = tmp_path / "stranger"
    stranger_dir.mkdir()
    _, stranger_secret = zmq.auth.create_certificates(stranger_dir, "stranger")
    security = ServerSecurity(keys)
    with running_servers(LAYOUT, INITIAL, sgd_factory(), {"consistency": "async"},
                         securities=[security]) as ((server,), endpoints):
        ctx = zmq.Context()
        try:
            plain = attempt(ctx, endpoints[0])                                     # no CURVE at all
            wrong = attempt(ctx, endpoints[0], ClientSecurity(keys / "server.key", stranger_secret).apply)
            # right client key but the wrong server key: the client cannot even complete the handshake
            fake_server = ClientSecurity(stranger_dir / "stranger.key", keys / "private" / "worker-0.key_secret")
            spoofed = attempt(ctx, endpoints[0], fake_server.apply)
        finally:
            ctx.term()
        assert plain is None and wrong is None and spoofed is None
        assert server.requests == 0 and server.updates == 0           # not one message reached the server
        assert security.denied >= 1

        client = PSClient(endpoints, LAYOUT, 0, security=ClientSecurity.from_dir(keys, "worker-0"),
                          heartbeat_interval=0.2)
        target = np.zeros(32, "<f4")
        client.connect([target], timeout=5)
        client.pull()
        np.testing.assert_array_equal(target, INITIAL[0])             # unchanged by the refused attempts
        client.push([np.ones(32, "<f4")], pull=True)
        assert server.updates == 1
        client.leave()
        client.close()

        # a key added to clients/ while the server runs is accepted (the allow list is re-read)
        generate_keys(keys, ["worker-9"])
        late = PSClient(endpoints, LAYOUT, 9, security=ClientSecurity.from_dir(keys, "worker-9"), observer=True)
        late.connect([np.zeros(32, "<f4")], timeout=5)
        late.close()


def test_insecure_mode_is_loopback_only():
    for ok in ("tcp://127.0.0.1:5555", "tcp://localhost:1", "tcp://[::1]:7", "ipc:///tmp/x", "inproc://a"):
        assert is_loopback_endpoint(ok)
        check_insecure_endpoint(ok)
    for bad in ("tcp://*:5555", "tcp://0.0.0.0:1", "tcp://10.0.0.2:1", "tcp://example.org:1", "tcp://eth0:5"):
        assert not is_loopback_endpoint(bad)
        with pytest.raises(AuthError, match="loopback"):
            check_insecure_endpoint(bad)


def test_cli_refuses_an_insecure_server_on_a_public_address(ps_job, tmp_path):
    _, job = ps_job()
    out = subprocess.run([sys.executable, "-m", "disttrain.paramserver.cli", "ps-server", str(job), "--index", "0",
                          "--bind", "tcp://0.0.0.0:0", "--insecure"], capture_output=True, text=True, timeout=60)
    assert out.returncode == 2 and "loopback" in out.stderr
    out = subprocess.run([sys.executable, "-m", "disttrain.paramserver.cli", "ps-server", str(job), "--index", "0"],
                         capture_output=True, text=True, timeout=60)
    assert out.returncode == 2 and "--keys" in out.stderr


def test_missing_keys_are_reported(tmp_path):
    with pytest.raises(AuthError, match="key"):
        ServerSecurity(tmp_path)
    with pytest.raises(AuthError, match="key"):
        ClientSecurity.from_dir(tmp_path, "worker-0")



def test_secret_keys_are_created_private(tmp_path, monkeypatch):
    """0600 from the moment the file exists: not after a chmod (here made a no-op), whatever the umask."""
    monkeypatch.setattr("os.chmod", lambda *args, **kwargs: None)
    old = os.umask(0)
    try:
        keys = generate_keys(tmp_path / "keys", ["worker-0"])
    finally:
        os.umask(old)
    for secret in (keys / "server.key_secret", keys / "private" / "worker-0.key_secret"):
        assert secret.stat().st_mode & 0o777 == 0o600, secret
        public, private = zmq.auth.load_certificate(secret)
        assert len(public) == len(private) == 40
    assert zmq.auth.load_certificate(keys / "clients" / "worker-0.key")[1] is None
