"""A real Qdrant server on loopback, one node or a cluster of peers, for tests, benches and CI.

Users run Qdrant from its official images or release binaries (deploy/). This module starts
the same server as a child process, each node with its own free ports and storage, so that
the server code path is tested against the engine it runs on in production.

The binary is found by ``find_qdrant``: an explicit path (``LOUPE_QDRANT_BIN``, read by the
callers), else ``qdrant`` on the PATH, else the one cached in ``~/.cache/loupe/qdrant``
(``make qdrant`` puts Qdrant's official release binary there: ``provision_qdrant``).
"""

from __future__ import annotations

import io
import json
import logging
import os
import shutil
import signal
import ssl
import subprocess
import tarfile
import time
import urllib.error
import urllib.request
from dataclasses import dataclass
from pathlib import Path

from loupe.consumers.errors import LoupeError
from loupe.dev.kafka import free_loopback_port
from loupe.dev.tls import Certificates

log = logging.getLogger(__name__)

# The server version the tests and the compose stack run; Loupe supports the versions in
# consumers/index/interface.py (SUPPORTED_SERVER_VERSIONS).
QDRANT_VERSION = "1.18.3"
DEFAULT_CACHE_DIR = Path.home() / ".cache" / "loupe" / "qdrant"
# Qdrant's official release binary (statically linked, Linux x86_64), for `make qdrant`.
RELEASE_URL = (
    "https://github.com/qdrant/qdrant/releases/download/v{version}/"
    "qdrant-x86_64-unknown-linux-musl.tar.gz"
)
MAX_DOWNLOAD_BYTES = 200 * 1024 * 1024


class QdrantServerError(LoupeError):
    """A local Qdrant server could not be found, started or reached."""


def cached_binary(cache_dir: Path = DEFAULT_CACHE_DIR) -> Path:
    return cache_dir / QDRANT_VERSION / "qdrant"


def find_qdrant(explicit: str | None = None, cache_dir: Path = DEFAULT_CACHE_DIR) -> Path:
    """The Qdrant server binary to run: ``explicit``, else ``qdrant`` on the PATH, else the
    cached one. Raises ``QdrantServerError`` saying where it looked and how to get one."""
    if explicit:
        path = Path(explicit).expanduser()
        if not (path.is_file() and os.access(path, os.X_OK)):
            raise QdrantServerError(f"LOUPE_QDRANT_BIN={explicit} is not an executable file")
        return path
    on_path = shutil.which("qdrant")
    if on_path is not None:
        return Path(on_path)
    cached = cached_binary(cache_dir)
    if cached.is_file() and os.access(cached, os.X_OK):
        return cached
    raise QdrantServerError(
        "no Qdrant server binary: set LOUPE_QDRANT_BIN, put `qdrant` on the PATH, or run "
        f"`make qdrant` (Qdrant {QDRANT_VERSION}'s release binary into {cached.parent})"
    )


def provision_qdrant(explicit: str | None = None, cache_dir: Path = DEFAULT_CACHE_DIR) -> Path:
    """``find_qdrant``, or else download Qdrant's official release binary into the cache (a
    machine with internet: ``make qdrant``). Raises ``QdrantServerError`` saying what to do."""
    try:
        return find_qdrant(explicit, cache_dir)
    except QdrantServerError:
        if explicit:
            raise
    target = cached_binary(cache_dir)
    url = RELEASE_URL.format(version=QDRANT_VERSION)
    log.info("downloading Qdrant %s from %s (once)", QDRANT_VERSION, url)
    try:
        with urllib.request.urlopen(url, timeout=60) as response:
            data = response.read(MAX_DOWNLOAD_BYTES + 1)
    except (urllib.error.URLError, OSError) as exc:
        raise QdrantServerError(
            f"no Qdrant server binary here, and {url} could not be downloaded ({exc}): install "
            f"Qdrant {QDRANT_VERSION} and set LOUPE_QDRANT_BIN to its binary"
        ) from exc
    if len(data) > MAX_DOWNLOAD_BYTES:
        raise QdrantServerError(f"{url} is larger than {MAX_DOWNLOAD_BYTES} bytes; not used")
    with tarfile.open(fileobj=io.BytesIO(data), mode="r:gz") as archive:
        member = next((m for m in archive.getmembers() if Path(m.name).name == "qdrant"), None)
        if member is None or not member.isfile():
            raise QdrantServerError(f"{url} holds no `qdrant` binary")
        binary = archive.extractfile(member).read()
    target.parent.mkdir(parents=True, exist_ok=True)
    partial = target.with_name("qdrant.partial")
    partial.write_bytes(binary)
    partial.chmod(0o755)
    partial.replace(target)
    return target


@dataclass(frozen=True)
class QdrantSecurity:
    """A server as production runs one: every call but the health checks needs ``api_key``
    (``service.api_key``), and the API speaks TLS with ``certificates`` (``service.enable_tls``;
    the peers' p2p port stays plain, on loopback)."""

    api_key: str
    certificates: Certificates


@dataclass(frozen=True)
class QdrantNode:
    """One running (or stopped) node: its ports, its storage, its process."""

    name: str
    http_port: int
    grpc_port: int
    p2p_port: int
    state_dir: Path
    tls: bool = False

    @property
    def url(self) -> str:
        return f"{'https' if self.tls else 'http'}://127.0.0.1:{self.http_port}"

    @property
    def p2p_uri(self) -> str:
        return f"http://127.0.0.1:{self.p2p_port}"


class LocalQdrant:
    """Qdrant nodes as child processes: ``start(1)`` for one server, ``start(3)`` for a cluster
    of three peers (Raft consensus over the p2p ports). Nodes can be killed and restarted with
    their storage (``kill``/``restart``), as a crashed peer comes back."""

    def __init__(
        self, state_dir: Path, binary: Path | None = None, security: QdrantSecurity | None = None
    ) -> None:
        self.state_dir = Path(state_dir)
        self.binary = binary or find_qdrant()
        self.security = security
        self.nodes: list[QdrantNode] = []
        self._procs: dict[str, subprocess.Popen] = {}

    @property
    def url(self) -> str:
        """The first node's URL: a client may talk to any peer of a cluster."""
        return self.nodes[0].url

    def settings(self) -> dict[str, str]:
        """The ``LOUPE_*`` settings (lower-case names) that point Loupe at this server."""
        found = {"index_url": self.url}
        if self.security is not None:
            found["index_api_key"] = self.security.api_key
            found["index_ca"] = str(self.security.certificates.ca)
        return found

    def store_options(self) -> dict[str, str]:
        """``QdrantStore``'s connection options for this server."""
        if self.security is None:
            return {"url": self.url}
        return {
            "url": self.url,
            "api_key": self.security.api_key,
            "ca": str(self.security.certificates.ca),
        }

    def _get(self, node: QdrantNode, path: str) -> tuple[int, bytes]:
        """GET ``path`` from ``node`` as a client with the key and the CA would."""
        request = urllib.request.Request(f"{node.url}{path}")
        context = None
        if self.security is not None:
            request.add_header("api-key", self.security.api_key)
            context = ssl.create_default_context(cafile=str(self.security.certificates.ca))
        with urllib.request.urlopen(request, timeout=2, context=context) as response:
            return response.status, response.read()

    @property
    def clustered(self) -> bool:
        return len(self.nodes) > 1

    def start(self, peers: int = 1, timeout_s: float = 60.0) -> LocalQdrant:
        if peers < 1:
            raise ValueError(f"peers must be at least 1, got {peers}")
        for n in range(peers):
            node = QdrantNode(
                name=f"node{n}",
                http_port=free_loopback_port(),
                grpc_port=free_loopback_port(),
                p2p_port=free_loopback_port(),
                state_dir=self.state_dir / f"node{n}",
                tls=self.security is not None,
            )
            self.nodes.append(node)
            self._launch(node, bootstrap=self.nodes[0] if n > 0 else None, clustered=peers > 1)
            self._wait_ready(node, timeout_s)  # a peer joins through a first node that answers
        if peers > 1:
            self.wait_for_peers(peers, timeout_s)
        return self

    def kill(self, name: str) -> None:
        """SIGKILL one node, as a crash would."""
        proc = self._procs.pop(name)
        proc.send_signal(signal.SIGKILL)
        proc.wait()

    def restart(self, name: str, timeout_s: float = 60.0) -> None:
        """Start a killed node again on its ports, with its storage."""
        node = next(n for n in self.nodes if n.name == name)
        self._launch(node, bootstrap=None, clustered=self.clustered)
        self._wait_ready(node, timeout_s)

    def stop(self) -> None:
        for proc in self._procs.values():
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
        for proc in self._procs.values():
            try:
                proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        self._procs.clear()

    def __enter__(self) -> LocalQdrant:
        return self

    def __exit__(self, *exc) -> None:
        self.stop()

    def wait_for_peers(self, peers: int, timeout_s: float = 60.0) -> None:
        """Until every node sees ``peers`` peers and a Raft leader."""
        deadline = time.monotonic() + timeout_s
        while True:
            seen = [self._cluster(node) for node in self.nodes if node.name in self._procs]
            if seen and all(
                c and len(c.get("peers", {})) == peers and c.get("raft_info", {}).get("leader")
                for c in seen
            ):
                return
            if time.monotonic() > deadline:
                raise QdrantServerError(f"the cluster did not form {peers} peers: {seen}")
            time.sleep(0.3)

    def _cluster(self, node: QdrantNode) -> dict | None:
        try:
            return json.loads(self._get(node, "/cluster")[1])["result"]
        except (urllib.error.URLError, OSError, ValueError, KeyError):
            return None

    def _launch(self, node: QdrantNode, bootstrap: QdrantNode | None, clustered: bool) -> None:
        node.state_dir.mkdir(parents=True, exist_ok=True)
        config = node.state_dir / "config.yaml"
        config.write_text(_config(node, clustered, self.security))
        args = [str(self.binary), "--config-path", str(config), "--disable-telemetry"]
        if clustered:
            args += ["--uri", node.p2p_uri]
            if bootstrap is not None:
                args += ["--bootstrap", bootstrap.p2p_uri]
        with (node.state_dir / "qdrant.log").open("ab") as out:
            self._procs[node.name] = subprocess.Popen(
                args,
                cwd=node.state_dir,
                stdout=out,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
            )

    def _wait_ready(self, node: QdrantNode, timeout_s: float) -> None:
        deadline = time.monotonic() + timeout_s
        proc = self._procs[node.name]
        while True:
            if proc.poll() is not None:
                raise QdrantServerError(
                    f"Qdrant {node.name} exited with status {proc.returncode} during start-up; "
                    f"its log:\n{self.log_tail(node.name)}"
                )
            try:
                if self._get(node, "/readyz")[0] == 200:
                    return
            except (urllib.error.URLError, OSError):
                pass
            if time.monotonic() > deadline:
                raise QdrantServerError(
                    f"Qdrant {node.name} did not answer on {node.url} within {timeout_s:.0f} s; "
                    f"its log:\n{self.log_tail(node.name)}"
                )
            time.sleep(0.2)

    def log_tail(self, name: str, chars: int = 3000) -> str:
        path = self.state_dir / name / "qdrant.log"
        try:
            return path.read_text(errors="replace")[-chars:]
        except FileNotFoundError:
            return "(no log written)"


def _config(node: QdrantNode, clustered: bool, security: QdrantSecurity | None = None) -> str:
    # JSON is YAML: no YAML writer needed. Loopback only; telemetry off.
    config = {
        "log_level": "WARN",
        "telemetry_disabled": True,
        "storage": {
            "storage_path": str(node.state_dir / "storage"),
            "snapshots_path": str(node.state_dir / "snapshots"),
        },
        "service": {
            "host": "127.0.0.1",
            "http_port": node.http_port,
            "grpc_port": node.grpc_port,
            "enable_cors": False,
        },
        "cluster": {
            "enabled": clustered,
            "p2p": {"port": node.p2p_port},
            "consensus": {"tick_period_ms": 100},
        },
    }
    if security is not None:
        config["service"].update({"api_key": security.api_key, "enable_tls": True})
        config["tls"] = {
            "cert": str(security.certificates.cert),
            "key": str(security.certificates.key),
        }
    return json.dumps(config, indent=2)


if __name__ == "__main__":  # `make qdrant`
    import sys

    logging.basicConfig(level=logging.INFO, format="%(message)s")
    try:
        print(provision_qdrant(os.environ.get("LOUPE_QDRANT_BIN")))
    except QdrantServerError as exc:
        print(f"error: {exc}", file=sys.stderr)
        sys.exit(2)
