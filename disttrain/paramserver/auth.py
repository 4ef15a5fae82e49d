"""Authentication and encryption of cluster traffic with ZMQ CURVE (CurveZMQ), and ZAP on the servers.

Key directory (written by `generate_keys`, e.g. by `disttrain ps-cluster` or `disttrain ps-keys`):

    KEYS/server.key              the servers' public key: every worker needs it
    KEYS/server.key_secret       the servers' secret key: only servers get it (mode 0600)
    KEYS/clients/NAME.key        public keys of the clients the servers accept (worker-0, ..., admin)
    KEYS/private/NAME.key_secret each client's secret key: give worker k only private/worker-k.key_secret

A server runs a ZAP handler (pyzmq's ThreadAuthenticator) that accepts a connection only when the client's
public key is one of KEYS/clients/*.key (re-read at most once a second on an unknown key, so keys added to a
running cluster are picked up). A client without CURVE, or with a key not listed, completes no handshake: no
message of it reaches the server's code, so it gets nothing and changes nothing.

The name of a key file is what the key may do (the server enforces it, server.py): `worker-K` joins as worker
K and nobody else, `admin` observes and reads stats, any other name only observes. The ZAP handler stamps
every message with its client's public key (the "User-Id" property of its frames); `ServerSecurity.client`
turns that back into the name. Secret keys are created with mode 0600 (never readable by others, not even for
a moment).

Insecure mode (`--insecure`) turns CURVE off for debugging and is refused unless every endpoint is loopback
(127.0.0.0/8, ::1, localhost) or local (ipc://, inproc://).
"""
import datetime
import ipaddress
import os
import re
import threading
import time
from dataclasses import dataclass
from pathlib import Path

import zmq
import zmq.auth
from zmq.auth.thread import ThreadAuthenticator

from disttrain.paramserver.protocol import MAX_WORKER_ID

__all__ = ["AuthError", "Client", "generate_keys", "worker_key_name", "ServerSecurity", "ClientSecurity",
           "check_insecure_endpoint", "is_loopback_endpoint", "SERVER_NAME", "ADMIN_NAME"]

SERVER_NAME = "server"
ADMIN_NAME = "admin"
ZAP_DOMAIN = "disttrain-ps"
_WORKER_NAME = re.compile(r"worker-(0|[1-9][0-9]*)")


class AuthError(RuntimeError):
    """Keys missing or unusable, or an insecure setup that is not confined to this machine."""


@dataclass(frozen=True)
class Client:
    """An authenticated client, named by its key file clients/NAME.key."""
    name: str

    @property
    def worker(self):
        """K for a key named worker-K (the only worker id it may join as), else None."""
        match = _WORKER_NAME.fullmatch(self.name)
        return int(match.group(1)) if match and int(match.group(1)) <= MAX_WORKER_ID else None

    @property
    def admin(self):
        return self.name == ADMIN_NAME


def worker_key_name(worker):
    return f"worker-{worker}"


def generate_keys(directory, clients):
    """Create the server key pair and one key pair per client name, keeping any that exist; returns the dir."""
    directory = Path(directory)
    for sub in (directory, directory / "clients", directory / "private"):
        sub.mkdir(parents=True, exist_ok=True)
    os.chmod(directory / "private", 0o700)
    if not (directory / f"{SERVER_NAME}.key_secret").exists():
        _write_pair(directory / f"{SERVER_NAME}.key", directory / f"{SERVER_NAME}.key_secret")
    for name in clients:
        if not (directory / "private" / f"{name}.key_secret").exists():
            _write_pair(directory / "clients" / f"{name}.key", directory / "private" / f"{name}.key_secret")
    return directory


def _write_pair(public_path, secret_path):
    """A new CURVE key pair in zmq.auth's certificate format: the public file first (replaced atomically), then
    the secret one, created with mode 0600 so that it is never readable by anyone else."""
    public, secret = zmq.curve_keypair()
    tmp = public_path.with_name(public_path.name + ".tmp")
    tmp.write_text(_certificate("Public", public))
    tmp.replace(public_path)
    secret_path.unlink(missing_ok=True)                # a half-written one (a crash in an earlier run)
    fd = os.open(secret_path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "w", encoding="utf-8") as fh:
        fh.write(_certificate("**Secret**", public, secret))


def _certificate(kind, public, secret=None):
    lines = [f"#   ****  Generated on {datetime.datetime.now()} by disttrain ps-keys  ****",
             f"#   ZeroMQ CURVE {kind} Certificate", "", "metadata", "curve",
             f'    public-key = "{public.decode()}"']
    if secret is not None:
        lines.append(f'    secret-key = "{secret.decode()}"')
    return "\n".join(lines) + "\n"


def _load(path, need_secret):
    path = Path(path)
    try:
        public, secret = zmq.auth.load_certificate(path)
    except (OSError, ValueError) as exc:
        raise AuthError(f"{path}: cannot load a CURVE key ({exc})") from None
    if need_secret and not secret:
        raise AuthError(f"{path}: holds no secret key; expected a .key_secret file")
    return public, secret


class _AllowList:
    """ZAP credentials provider: accepts the public keys of KEYS/clients/*.key, and names them."""

    def __init__(self, clients_dir):
        self.clients_dir = Path(clients_dir)
        self.lock = threading.Lock()
        self.denied = 0
        self.names = {}                          # z85 public key -> file name without .key
        self._loaded_at = -1.0
        shared = self._reload()
        if shared:
            raise AuthError(f"{self.clients_dir}: one key is listed under several names ({', '.join(shared)}); "
                            f"every client needs its own key")

    def _reload(self):
        """Read the key files; a key listed under two names is left out (it could not be told apart)."""
        names, shared = {}, set()
        for path in sorted(self.clients_dir.glob("*.key")):
            public, _ = _load(path, need_secret=False)
            if public in names:
                shared |= {names[public], path.stem}
            names.setdefault(public, path.stem)
        self.names = {key: name for key, name in names.items() if name not in shared}
        self._loaded_at = time.monotonic()
        return sorted(shared)

    def callback(self, domain, key):
        with self.lock:
            if key in self.names:
                return True
            if time.monotonic() - self._loaded_at > 1.0:
                self._reload()
                if key in self.names:
                    return True
            self.denied += 1
            return False


class ServerSecurity:
    """CURVE server side: the server key pair and the allowed client keys of a key directory."""

    def __init__(self, keys_dir):
        keys_dir = Path(keys_dir)
        self.public, self.secret = _load(keys_dir / f"{SERVER_NAME}.key_secret", need_secret=True)
        if not (keys_dir / "clients").is_dir():
            raise AuthError(f"{keys_dir / 'clients'}: missing; it must hold the public keys of allowed clients")
        self.allow = _AllowList(keys_dir / "clients")
        self._authenticator = None

    def start(self, context):
        """Start the ZAP handler on `context` (once per context, before binding)."""
        self._authenticator = ThreadAuthenticator(context)
        self._authenticator.start()
        self._authenticator.configure_curve_callback(domain=ZAP_DOMAIN, credentials_provider=self.allow)

    def apply(self, socket):
        socket.zap_domain = ZAP_DOMAIN.encode()
        socket.curve_secretkey = self.secret
        socket.curve_publickey = self.public
        socket.curve_server = True

    def client(self, frame):
        """The Client that sent a received zmq.Frame (its User-Id, set by the ZAP handler), or None."""
        try:
            user_id = frame.get("User-Id")
        except zmq.ZMQError:
            return None
        name = self.allow.names.get(user_id.encode("ascii", "replace"))
        return Client(name) if name is not None else None

    def stop(self):
        if self._authenticator is not None:
            self._authenticator.stop()
            self._authenticator = None

    @property
    def denied(self):
        return self.allow.denied


class ClientSecurity:
    """CURVE client side: the server's public key and this client's key pair."""

    def __init__(self, server_public_key_file, client_secret_key_file):
        self.server_public, _ = _load(server_public_key_file, need_secret=False)
        self.public, self.secret = _load(client_secret_key_file, need_secret=True)

    @classmethod
    def from_dir(cls, keys_dir, name):
        keys_dir = Path(keys_dir)
        return cls(keys_dir / f"{SERVER_NAME}.key", keys_dir / "private" / f"{name}.key_secret")

    def apply(self, socket):
        socket.curve_serverkey = self.server_public
        socket.curve_publickey = self.public
        socket.curve_secretkey = self.secret


def is_loopback_endpoint(endpoint):
    """True for ipc://, inproc:// and tcp:// on 127.0.0.0/8, ::1 or localhost."""
    scheme, _, rest = endpoint.partition("://")
    if scheme in ("ipc", "inproc"):
        return True
    if scheme != "tcp":
        return False
    host = rest.rsplit(":", 1)[0].strip("[]")
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False            # "*", an interface name or a host name: may be reachable from elsewhere


def check_insecure_endpoint(endpoint):
    if not is_loopback_endpoint(endpoint):
        raise AuthError(f"--insecure is for debugging on one machine: {endpoint} is not a loopback endpoint "
                        f"(use tcp://127.0.0.1:PORT), or drop --insecure and use CURVE keys")
