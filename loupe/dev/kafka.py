"""A real, single-node Apache Kafka broker (KRaft) on loopback, for laptops, tests and CI.

Nothing ships a Kafka distribution here, so the broker's jars come from Maven Central (``mvn
dependency:copy-dependencies`` over the POM below), once, into a cache outside the clone
(``~/.cache/loupe/kafka/<version>``). Each
broker keeps everything it owns (``server.properties``, data, log, pid, ``state.json``) in one
state directory, so ``loupe kafka stop`` and ``status`` find it again from another process.
"""

from __future__ import annotations

import base64
import contextlib
import json
import logging
import os
import re
import shutil
import signal
import socket
import subprocess
import time
import uuid
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from loupe.consumers.errors import LoupeError
from loupe.consumers.kafka.acls import Acl
from loupe.consumers.kafka.io import answers_metadata
from loupe.dev.tls import Certificates
from loupe.locks import file_lock

log = logging.getLogger(__name__)

# The one place the development broker's version is written; deploy/docker-compose.yml's image
# tag is checked against it (tests/unit/test_one_source.py).
KAFKA_VERSION = "4.1.2"
LOG4J_VERSION = "2.25.3"
DEFAULT_CACHE_DIR = Path.home() / ".cache" / "loupe" / "kafka"
DEFAULT_STATE_DIR = Path.home() / ".local" / "state" / "loupe" / "kafka"


class BrokerError(LoupeError):
    """The local Kafka broker could not be provisioned, started, reached or stopped."""


@dataclass(frozen=True)
class BrokerSecurity:
    """A broker that authenticates and authorizes, as a production one does: one ``SASL_SSL``
    listener (SCRAM-SHA-512 over TLS with ``certificates``), the KRaft ``StandardAuthorizer``
    with ``allow.everyone.if.no.acl.found=false`` (no ACL, no access), and ``users``' SCRAM
    credentials written at format time. ``admin`` is the broker's own principal and the only
    super user; every other user can do exactly what ACLs grant it."""

    certificates: Certificates
    users: dict[str, str] = field(default_factory=dict)  # user -> password, besides the admin
    admin: str = "admin"
    admin_password: str = field(default_factory=lambda: uuid.uuid4().hex)

    def client_config(self, user: str | None = None) -> dict[str, Any]:
        """kafka-python's options for ``user`` (the admin by default), bootstrap aside."""
        user = user or self.admin
        password = self.admin_password if user == self.admin else self.users[user]
        return {
            "security_protocol": "SASL_SSL",
            "sasl_mechanism": "SCRAM-SHA-512",
            "sasl_plain_username": user,
            "sasl_plain_password": password,
            "ssl_cafile": str(self.certificates.ca),
        }

    def properties(self, state_dir: Path) -> str:
        keystore = state_dir / "keystore.pem"  # Kafka's PEM key store: the key, then the chain
        keystore.write_text(
            self.certificates.key.read_text()
            + self.certificates.cert.read_text()
            + self.certificates.ca.read_text()
        )
        jaas = (
            "org.apache.kafka.common.security.scram.ScramLoginModule required "
            f'username="{self.admin}" password="{self.admin_password}";'
        )
        # The controller listener stays PLAINTEXT on loopback: its principal is ANONYMOUS, and
        # the controller must let the broker (itself) register, so ANONYMOUS is a super user.
        return f"""\
sasl.enabled.mechanisms=SCRAM-SHA-512
sasl.mechanism.inter.broker.protocol=SCRAM-SHA-512
listener.name.sasl_ssl.scram-sha-512.sasl.jaas.config={jaas}
ssl.keystore.type=PEM
ssl.keystore.location={keystore}
ssl.truststore.type=PEM
ssl.truststore.location={self.certificates.ca}
authorizer.class.name=org.apache.kafka.metadata.authorizer.StandardAuthorizer
allow.everyone.if.no.acl.found=false
super.users=User:{self.admin};User:ANONYMOUS
"""

    def format_args(self) -> list[str]:
        users = {self.admin: self.admin_password, **self.users}
        return [
            arg
            for user, password in users.items()
            for arg in ("--add-scram", f"SCRAM-SHA-512=[name={user},password={password}]")
        ]


@dataclass(frozen=True)
class BrokerState:
    """What a running broker left in ``state.json``: enough for another process to find it."""

    pid: int
    bootstrap_servers: str
    controller_port: int
    state_dir: str
    kafka_version: str
    started_at: float


def _require_tool(name: str, purpose: str) -> str:
    path = shutil.which(name)
    if path is None:
        raise BrokerError(
            f"`{name}` is not on PATH; it is needed to {purpose}. "
            "Install a Java 17+ JDK and Maven (Debian: `apt-get install openjdk-17-jdk-headless "
            "maven`) and try again."
        )
    return path


# The broker's runtime jars; nothing is built from it. Kafka 4.1 logs through SLF4J 1.7: route it
# to Log4j 2 so that the broker's log goes to a file.
_POM = """\
<?xml version="1.0" encoding="UTF-8"?>
<project xmlns="http://maven.apache.org/POM/4.0.0">
  <modelVersion>4.0.0</modelVersion>
  <groupId>dev.loupe</groupId>
  <artifactId>loupe-kafka-broker</artifactId>
  <version>{kafka}</version>
  <packaging>pom</packaging>
  <dependencyManagement>
    <dependencies>
      <dependency>
        <groupId>org.apache.logging.log4j</groupId>
        <artifactId>log4j-bom</artifactId>
        <version>{log4j}</version>
        <type>pom</type>
        <scope>import</scope>
      </dependency>
    </dependencies>
  </dependencyManagement>
  <dependencies>
    <dependency>
      <groupId>org.apache.kafka</groupId>
      <artifactId>kafka_2.13</artifactId>
      <version>{kafka}</version>
    </dependency>
    <dependency>
      <groupId>org.apache.logging.log4j</groupId>
      <artifactId>log4j-slf4j-impl</artifactId>
    </dependency>
    <dependency>
      <groupId>org.apache.logging.log4j</groupId>
      <artifactId>log4j-core</artifactId>
    </dependency>
  </dependencies>
</project>
"""


def provision_jars(cache_dir: Path = DEFAULT_CACHE_DIR) -> Path:
    """Return the directory holding the broker's jars, downloading them once if needed."""
    libs = cache_dir / KAFKA_VERSION / "libs"
    marker = libs / ".complete"
    if marker.exists():
        return libs
    with file_lock(cache_dir / f"{KAFKA_VERSION}.lock"):
        if marker.exists():
            return libs
        mvn = _require_tool("mvn", "download Apache Kafka's jars from Maven Central")
        staging = libs.with_name("libs.partial")
        shutil.rmtree(staging, ignore_errors=True)
        pom = cache_dir / KAFKA_VERSION / "pom.xml"
        pom.parent.mkdir(parents=True, exist_ok=True)
        pom.write_text(_POM.format(kafka=KAFKA_VERSION, log4j=LOG4J_VERSION))
        log.info("downloading Apache Kafka %s jars into %s (once)", KAFKA_VERSION, libs)
        started = time.monotonic()
        result = subprocess.run(
            [
                mvn,
                "-q",
                "-B",
                "-f",
                str(pom),
                "dependency:copy-dependencies",
                "-DincludeScope=runtime",
                f"-DoutputDirectory={staging}",
            ],
            capture_output=True,
            text=True,
            check=False,
        )
        if result.returncode != 0:
            tail = (result.stdout + result.stderr)[-2000:]
            raise BrokerError(
                f"Maven could not fetch Kafka's jars (exit {result.returncode}); is Maven Central "
                f"reachable? Last output:\n{tail}"
            )
        shutil.rmtree(libs, ignore_errors=True)
        staging.rename(libs)
        marker.touch()
        log.info("Kafka jars ready in %.1f s", time.monotonic() - started)
    return libs


def new_cluster_id() -> str:
    """A random KRaft cluster id, as Kafka's ``Uuid.randomUuid`` makes one: URL-safe base64 of
    16 random bytes, never starting with '-' (the storage tool would read it as an option:
    one start in 64 failed with "argument --cluster-id/-t: expected one argument")."""
    while True:
        cluster_id = base64.urlsafe_b64encode(uuid.uuid4().bytes).decode().rstrip("=")
        if not cluster_id.startswith("-"):
            return cluster_id


def free_loopback_port() -> int:
    """A TCP port that is free on 127.0.0.1 right now (the OS picks it)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _check_port_free(port: int) -> None:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        try:
            sock.bind(("127.0.0.1", port))
        except OSError as exc:
            raise BrokerError(
                f"port {port} on 127.0.0.1 is already in use ({exc.strerror}); stop whatever "
                "listens there (`ss -ltnp 'sport = :{port}'`) or choose another port with --port"
            ) from exc


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    # A zombie child still answers kill(0); reap it if it is ours.
    with contextlib.suppress(ChildProcessError):
        done, _ = os.waitpid(pid, os.WNOHANG)
        if done == pid:
            return False
    return True


_LOG4J2_PROPERTIES = """\
status = warn
appender.file.type = File
appender.file.name = file
appender.file.fileName = {log_file}
appender.file.layout.type = PatternLayout
appender.file.layout.pattern = [%d] %p %m (%c)%n
rootLogger.level = WARN
rootLogger.appenderRef.file.ref = file
logger.server.name = kafka.server.KafkaRaftServer
logger.server.level = INFO
logger.state.name = state.change.logger
logger.state.level = WARN
"""


def _server_properties(
    data_dir: Path, broker_port: int, controller_port: int, secure: bool = False
) -> str:
    # Single node, both roles, replication 1: a development broker, not a production one.
    listener = "SASL_SSL" if secure else "PLAINTEXT"
    return f"""\
process.roles=broker,controller
node.id=1
controller.quorum.voters=1@127.0.0.1:{controller_port}
listeners={listener}://127.0.0.1:{broker_port},CONTROLLER://127.0.0.1:{controller_port}
advertised.listeners={listener}://127.0.0.1:{broker_port}
controller.listener.names=CONTROLLER
inter.broker.listener.name={listener}
listener.security.protocol.map=CONTROLLER:PLAINTEXT,{listener}:{listener}
log.dirs={data_dir}
num.partitions=1
offsets.topic.replication.factor=1
offsets.topic.num.partitions=4
transaction.state.log.replication.factor=1
transaction.state.log.min.isr=1
share.coordinator.state.topic.replication.factor=1
share.coordinator.state.topic.min.isr=1
group.initial.rebalance.delay.ms=0
auto.create.topics.enable=false
log.retention.hours=24
"""


class LocalKafkaBroker:
    """One broker process and the state directory it lives in.

    ``start()`` provisions jars, writes the configuration, formats storage, launches the broker
    in its own session (so it outlives the ``loupe kafka start`` command) and waits until it
    answers a metadata request. ``stop()`` sends SIGTERM and kills only if it will not exit.
    """

    def __init__(
        self,
        state_dir: Path = DEFAULT_STATE_DIR,
        cache_dir: Path = DEFAULT_CACHE_DIR,
        heap: str = "512m",
        die_with_parent: bool = False,
        security: BrokerSecurity | None = None,
    ) -> None:
        """``die_with_parent``: the broker gets SIGTERM when the process that started it dies,
        even by SIGKILL (tests, the demo). ``loupe kafka start`` leaves it off: that broker must
        outlive the command. ``security``: SASL_SSL and ACLs instead of one PLAINTEXT
        listener that lets anyone do anything."""
        self.state_dir = Path(state_dir)
        self.cache_dir = Path(cache_dir)
        self.heap = heap
        self.die_with_parent = die_with_parent
        self.security = security

    def client_config(self, bootstrap_servers: str, user: str | None = None) -> dict[str, Any]:
        """kafka-python's options to reach this broker, as ``user`` where it is secured."""
        config: dict[str, Any] = {"bootstrap_servers": [bootstrap_servers]}
        if self.security is not None:
            config.update(self.security.client_config(user))
        return config

    def grant(self, bootstrap_servers: str, user: str, acls: list[Acl]) -> None:
        """Allow ``user`` exactly ``acls`` on this (secured) broker, as its admin."""
        from kafka.admin import (
            ACL,
            ACLOperation,
            ACLPermissionType,
            ACLResourcePatternType,
            ResourcePattern,
            ResourceType,
        )

        resources = {
            "topic": ResourceType.TOPIC,
            "group": ResourceType.GROUP,
            "transactional-id": ResourceType.TRANSACTIONAL_ID,
        }
        patterns = {
            "literal": ACLResourcePatternType.LITERAL,
            "prefixed": ACLResourcePatternType.PREFIXED,
        }
        entries = [
            ACL(
                principal=f"User:{user}",
                host="*",
                operation=ACLOperation[re.sub(r"(?<!^)(?=[A-Z])", "_", operation).upper()],
                permission_type=ACLPermissionType.ALLOW,
                resource_pattern=ResourcePattern(
                    resources[acl.resource], acl.name, patterns[acl.pattern]
                ),
            )
            for acl in acls
            for operation in acl.operations
        ]
        from loupe.consumers.kafka.admin import KafkaAdmin

        with KafkaAdmin(self.client_config(bootstrap_servers)) as admin:
            admin.create_acls(entries)

    @property
    def state_file(self) -> Path:
        return self.state_dir / "state.json"

    @property
    def log_file(self) -> Path:
        return self.state_dir / "broker.log"

    def read_state(self) -> BrokerState | None:
        try:
            return BrokerState(**json.loads(self.state_file.read_text()))
        except FileNotFoundError:
            return None
        except (ValueError, TypeError) as exc:
            raise BrokerError(f"{self.state_file} is corrupt ({exc}); delete it") from exc

    def running_state(self) -> BrokerState | None:
        """The state of a broker whose process is alive, or None."""
        state = self.read_state()
        if state is not None and _pid_alive(state.pid):
            return state
        return None

    def start(self, port: int | None = None, timeout_s: float = 90.0) -> BrokerState:
        existing = self.running_state()
        if existing is not None:
            raise BrokerError(
                f"a broker from {self.state_dir} is already running (pid {existing.pid}, "
                f"{existing.bootstrap_servers}); `loupe kafka stop` it first"
            )
        java = _require_tool("java", "run the Kafka broker")
        libs = provision_jars(self.cache_dir)
        if port is not None:
            _check_port_free(port)
        broker_port = port or free_loopback_port()
        controller_port = free_loopback_port()

        # A fresh data directory every start: this broker is for development and tests.
        data_dir = self.state_dir / "data"
        shutil.rmtree(data_dir, ignore_errors=True)
        self.state_dir.mkdir(parents=True, exist_ok=True)
        properties = self.state_dir / "server.properties"
        text = _server_properties(data_dir, broker_port, controller_port, self.security is not None)
        if self.security is not None:
            text += self.security.properties(self.state_dir)
        properties.write_text(text)
        log4j = self.state_dir / "log4j2.properties"
        log4j.write_text(_LOG4J2_PROPERTIES.format(log_file=self.log_file))

        classpath = f"{libs}/*"
        jvm = [java, f"-Xmx{self.heap}", f"-Xms{self.heap}", "-XX:+UseG1GC"]
        jvm += ["-Djava.awt.headless=true", f"-Dlog4j2.configurationFile={log4j}"]
        cluster_id = new_cluster_id()
        format_args = ["format", "-t", cluster_id, "-c", str(properties)]
        if self.security is not None:
            format_args += self.security.format_args()
        fmt = subprocess.run(
            [*jvm, "-cp", classpath, "kafka.tools.StorageTool", *format_args],
            capture_output=True,
            text=True,
            check=False,
        )
        if fmt.returncode != 0:
            raise BrokerError(
                f"formatting Kafka storage failed:\n{(fmt.stdout + fmt.stderr)[-2000:]}"
            )

        started_at = time.time()
        launcher = []
        if self.die_with_parent:
            # util-linux's setpriv sets PR_SET_PDEATHSIG and execs java in the same process.
            setpriv = shutil.which("setpriv")
            if setpriv is None:
                log.warning("setpriv not found: the broker may outlive a killed parent")
            else:
                launcher = [setpriv, "--pdeathsig", "TERM", "--"]
        with self.log_file.open("ab") as out:
            proc = subprocess.Popen(
                [*launcher, *jvm, "-cp", classpath, "kafka.Kafka", str(properties)],
                stdout=out,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                start_new_session=True,
            )
        state = BrokerState(
            pid=proc.pid,
            bootstrap_servers=f"127.0.0.1:{broker_port}",
            controller_port=controller_port,
            state_dir=str(self.state_dir),
            kafka_version=KAFKA_VERSION,
            started_at=started_at,
        )
        self.state_file.write_text(json.dumps(asdict(state), indent=2))
        try:
            self._wait_ready(state, proc, timeout_s)
        except BaseException:
            self.stop()
            raise
        log.info(
            "Kafka %s ready on %s in %.1f s (pid %d, state in %s)",
            KAFKA_VERSION,
            state.bootstrap_servers,
            time.time() - started_at,
            proc.pid,
            self.state_dir,
        )
        return state

    def _wait_ready(self, state: BrokerState, proc: subprocess.Popen, timeout_s: float) -> None:
        deadline = time.monotonic() + timeout_s
        delay = 0.1
        while True:
            if proc.poll() is not None:
                raise BrokerError(
                    f"the broker exited with status {proc.returncode} during start-up; "
                    f"last lines of {self.log_file}:\n{self._log_tail()}"
                )
            if answers_metadata(self.client_config(state.bootstrap_servers)):
                return
            if time.monotonic() > deadline:
                raise BrokerError(
                    f"the broker did not answer on {state.bootstrap_servers} within {timeout_s:.0f}"
                    f" s; last lines of {self.log_file}:\n{self._log_tail()}"
                )
            time.sleep(delay)
            delay = min(delay * 1.5, 1.0)

    def _log_tail(self, chars: int = 3000) -> str:
        try:
            return self.log_file.read_text(errors="replace")[-chars:]
        except FileNotFoundError:
            return "(no log written)"

    def stop(self, timeout_s: float = 30.0) -> bool:
        """Stop the broker; True if one was running. SIGTERM first, SIGKILL only on timeout."""
        state = self.read_state()
        if state is None or not _pid_alive(state.pid):
            self.state_file.unlink(missing_ok=True)
            return False
        os.kill(state.pid, signal.SIGTERM)
        deadline = time.monotonic() + timeout_s
        while _pid_alive(state.pid):
            if time.monotonic() > deadline:
                log.warning(
                    "broker pid %d ignored SIGTERM for %.0f s; killing", state.pid, timeout_s
                )
                os.kill(state.pid, signal.SIGKILL)
                while _pid_alive(state.pid):
                    time.sleep(0.05)
                break
            time.sleep(0.1)
        self.state_file.unlink(missing_ok=True)
        return True


def has_read_all(bootstrap: str, group: str, topic: str) -> bool:
    """Whether ``group`` has committed every record of ``topic`` (a transactional topic: its
    commit markers take offsets too, so the committed offsets stop short of the end offsets;
    what counts is that nothing is left to read after them)."""
    from kafka import KafkaConsumer
    from kafka.errors import KafkaError
    from kafka.structs import TopicPartition

    from loupe.consumers.kafka.admin import KafkaAdmin

    with KafkaAdmin({"bootstrap_servers": bootstrap}) as admin:
        try:
            offsets = admin.committed(group)
        except KafkaError:  # not joined yet, or its coordinator is loading or moving
            return False
    reader = KafkaConsumer(bootstrap_servers=bootstrap, isolation_level="read_committed")
    try:
        partitions = [TopicPartition(topic, p) for p in reader.partitions_for_topic(topic) or ()]
        if not partitions:
            return False
        reader.assign(partitions)
        for tp in partitions:
            reader.seek(tp, offsets.get(tp, 0))
        left = reader.poll(timeout_ms=1000)
        ends = reader.end_offsets(partitions)
        return not any(left.values()) and all(reader.position(tp) >= ends[tp] for tp in partitions)
    finally:
        reader.close()
