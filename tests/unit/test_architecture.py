"""The package's shape: layers that only depend downwards, no import cycles, one source per fact."""

from __future__ import annotations

import ast
import os
import re
from pathlib import Path

import yaml

import loupe
from loupe.dev.kafka import KAFKA_VERSION

PACKAGE = Path(loupe.__file__).resolve().parent
REPO = PACKAGE.parent

# Who may import whom, at any depth (including imports inside functions). The service never
# reaches for the CLI, the demo or the development tools; the model never for the service.
ALLOWED = {
    "schemas": {"schemas"},
    # The model knows nothing of the wire contract nor of Kafka: it raises its own exceptions
    # (encoders/errors.py), which the consumers map to the contract's error codes.
    "encoders": {"encoders", "locks"},
    "consumers": {"consumers", "encoders", "schemas", "ranking"},
    "client": {"client", "consumers", "encoders", "schemas"},
    "progress": {"progress"},
    # How a search answer is ordered: the service's search and training's evaluation share it.
    "ranking": {"ranking"},
    "locks": {"locks"},
    # Training never sees the simulators it is judged by (loupe.evaluation imports it, not the
    # other way round).
    "train": {"train", "progress", "ranking", "consumers", "encoders", "schemas"},
    "evaluation": {"evaluation", "train", "progress", "consumers", "encoders", "schemas"},
    "dev": {"dev", "train", "consumers", "encoders", "schemas", "locks"},
    "demo": {
        "demo",
        "dev",
        "train",
        "evaluation",
        "client",
        "progress",
        "consumers",
        "encoders",
        "schemas",
    },
    "cli": {
        "cli",
        "demo",
        "dev",
        "train",
        "evaluation",
        "client",
        "consumers",
        "encoders",
        "schemas",
        "__init__",
    },
    "__init__": set(),
    "__main__": {"cli"},
}


def _modules() -> dict[str, Path]:
    """Every module of the package, by its dotted name. ``consumers``, ``encoders`` and
    ``schemas`` are links in the repository, which ``Path.rglob`` does not follow: walked here."""
    found = {}
    paths = [
        Path(root) / name
        for root, _, names in os.walk(PACKAGE, followlinks=True)
        for name in names
        if name.endswith(".py")
    ]
    for path in sorted(paths):
        parts = path.relative_to(PACKAGE).with_suffix("").parts
        if parts[-1] == "__init__" and len(parts) > 1:
            parts = parts[:-1]
        found["loupe." + ".".join(parts)] = path
    return found


def _imports(path: Path, module_level_only: bool) -> set[str]:
    tree = ast.parse(path.read_text())
    nodes = tree.body if module_level_only else list(ast.walk(tree))
    names = set()
    for node in nodes:
        if isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names.add(node.module)
            names.update(f"{node.module}.{alias.name}" for alias in node.names)
        elif isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
    return {name for name in names if name == "loupe" or name.startswith("loupe.")}


def test_every_subpackage_imports_only_the_layers_below_it():
    modules = _modules()
    problems = []
    for name, path in modules.items():
        parts = name.split(".")
        layer = parts[1] if len(parts) > 1 else "__init__"
        for imported in _imports(path, module_level_only=False):
            parts = imported.split(".")
            target = parts[1] if len(parts) > 1 and parts[1] in ALLOWED else "__init__"
            if target not in ALLOWED[layer]:
                problems.append(f"{name} imports {imported}")
    assert not problems, "\n".join(problems)


def test_module_level_imports_have_no_cycles():
    modules = _modules()
    graph = {
        name: {i for i in _imports(path, module_level_only=True) if i in modules and i != name}
        for name, path in modules.items()
    }
    # A package's __init__ importing its own submodules is how packages work, not a cycle.
    for name in graph:
        graph[name] = {i for i in graph[name] if not name.startswith(i + ".")}
    visiting, done, cycles = set(), set(), []

    def visit(node: str, stack: list[str]) -> None:
        visiting.add(node)
        for nxt in sorted(graph[node]):
            if nxt in visiting:
                cycles.append(" -> ".join([*stack[stack.index(nxt) :], nxt]))
            elif nxt not in done:
                visit(nxt, [*stack, nxt])
        visiting.discard(node)
        done.add(node)

    for node in sorted(graph):
        if node not in done:
            visit(node, [node])
    assert not cycles, "\n".join(cycles)


def _python_sources() -> list[Path]:
    roots = [PACKAGE / "cli", PACKAGE / "dev", PACKAGE / "demo", REPO / "consumers"]
    roots += [REPO / "encoders", REPO / "bench"]
    return [p for root in roots for p in root.rglob("*.py")]


def test_topic_names_are_written_only_in_the_contracts():
    literal = re.compile(r"[\"']loupe\.[a-z.]+\.v1[\"']")
    offenders = [str(p) for p in _python_sources() if literal.search(p.read_text())]
    assert not offenders, f"topic names belong in schemas/ (Settings refers to them): {offenders}"


def test_the_compose_stack_runs_the_kafka_version_the_dev_broker_runs():
    compose = yaml.safe_load((REPO / "deploy" / "docker-compose.yml").read_text())
    tags = {
        service["image"].split(":")[1]
        for service in compose["services"].values()
        if service.get("image", "").startswith("apache/kafka:")
    }
    assert tags == {KAFKA_VERSION}


def test_the_kafka_version_is_written_once():
    pattern = re.compile(re.escape(f'"{KAFKA_VERSION}"'))
    holders = [p for p in _python_sources() if pattern.search(p.read_text())]
    assert holders == [PACKAGE / "dev" / "kafka.py"]


def test_no_default_of_the_model_or_fetcher_is_repeated_in_the_settings():
    source = (REPO / "consumers" / "settings.py").read_text()
    for literal in ("efficientnet-lite0", "all-minilm-l6-v2", "10 * 1024 * 1024", "40_000_000"):
        assert literal not in source, f"{literal} is a default of encoders/profile.py"


def test_the_compose_stack_runs_the_qdrant_the_tests_run():
    """The stack users start runs the server version the suite tests (loupe/dev/qdrant.py),
    which Loupe's start-up check supports, and so does the client Loupe locks."""
    from importlib.metadata import version

    from loupe.consumers.index.interface import SUPPORTED_SERVER_VERSIONS, check_server_version
    from loupe.dev.qdrant import QDRANT_VERSION

    compose = yaml.safe_load((REPO / "deploy" / "docker-compose.yml").read_text())
    tag = compose["services"]["qdrant"]["image"].split(":v")[1]
    assert tag == QDRANT_VERSION
    assert check_server_version(QDRANT_VERSION) is None
    client = tuple(int(part) for part in version("qdrant-client").split(".")[:2])
    first, last = SUPPORTED_SERVER_VERSIONS
    assert first <= client <= last, "the locked client is within the supported range"


def test_the_cluster_override_forms_three_peers_and_a_topology_loupe_accepts():
    from loupe.consumers.settings import Settings
    from loupe.dev.qdrant import QDRANT_VERSION

    cluster = yaml.safe_load((REPO / "deploy" / "docker-compose.cluster.yml").read_text())
    peers = {name: s for name, s in cluster["services"].items() if name.startswith("qdrant")}
    assert len(peers) == 3
    assert {p["image"] for p in peers.values()} == {f"qdrant/qdrant:v{QDRANT_VERSION}"}
    first = peers["qdrant"]["command"]
    assert first[first.index("--uri") + 1] == "http://qdrant:6335"
    for name in ("qdrant-2", "qdrant-3"):
        command = peers[name]["command"]
        assert command[command.index("--bootstrap") + 1] == "http://qdrant:6335"
        assert command[command.index("--uri") + 1] == f"http://{name}:6335"
    base = yaml.safe_load((REPO / "deploy" / "docker-compose.yml").read_text())
    for role in ("loupe-ingest", "loupe-search"):
        env = {**base["services"][role]["environment"], **cluster["services"][role]["environment"]}
        settings = Settings(**{k.removeprefix("LOUPE_").lower(): v for k, v in env.items()})
        topology = settings.index_topology()
        assert (topology.shards, topology.replication_factor, topology.write_consistency) == (
            3,
            2,
            1,
        )


# Classes allowed past MAX_CLASS_LINES in consumers/ and encoders/, each with its reason.
LONG_CLASSES: dict[str, str] = {
    "consumers/settings.py:Settings": "a flat declaration: one field per setting, each with its "
    "README line as its description, and the cross-field rules; no logic to follow",
}
MAX_CLASS_LINES = 250


def test_no_class_in_the_service_or_the_model_is_longer_than_a_page_or_two():
    too_long = []
    for layer in ("consumers", "encoders"):
        for path in sorted((PACKAGE / layer).glob("*.py")):
            for node in ast.walk(ast.parse(path.read_text())):
                if isinstance(node, ast.ClassDef):
                    lines = node.end_lineno - node.lineno + 1
                    name = f"{layer}/{path.name}:{node.name}"
                    if lines > MAX_CLASS_LINES and name not in LONG_CLASSES:
                        too_long.append(f"{name} has {lines} lines")
    assert not too_long, "\n".join(too_long)


def test_every_reason_the_model_fails_an_item_has_its_error_code():
    from loupe.consumers.errors import CODE_OF_REJECTION, ModelRejected
    from loupe.encoders.errors import ImageRejected, Rejection
    from loupe.schemas.errors import ErrorCode

    assert set(CODE_OF_REJECTION) == set(Rejection)
    failed = ModelRejected(ImageRejected(Rejection.IMAGE_TOO_LARGE, "too big"))
    assert (failed.code, failed.stage, str(failed)) == (
        ErrorCode.IMAGE_TOO_LARGE,
        "decode",
        "too big",
    )


def test_kafkas_admin_client_is_made_in_one_module():
    """``consumers/kafka/admin.py`` is the one door to Kafka's admin API, for the service and for
    the tests, benchmarks and development tools that administer a broker."""
    sources = [
        *_python_sources(),
        *(REPO / "tests").rglob("*.py"),
        *(PACKAGE / "train").rglob("*.py"),
    ]
    makers = {
        p
        for p in sources
        if "KafkaAdminClient(" in p.read_text() and p.name != "test_architecture.py"
    }
    assert makers == {REPO / "consumers" / "kafka" / "admin.py"}


# Inside the service (``loupe.consumers``): its parts, each a subpackage, and who may import
# whom. ``common`` is the package's own modules (settings, errors, metrics), which every part
# reads; they may import only the value types of the parts that settings build (``COMMON_READS``).
CONSUMER_PARTS = {
    "common": {"common"},
    "kafka": {"kafka", "common"},
    "index": {"index", "kafka", "common"},
    "workers": {"workers", "index", "kafka", "common"},
    "service": {"service", "workers", "index", "kafka", "common"},
}
COMMON_READS = {
    "loupe.consumers.kafka.failures",  # the failure classes errors carry
    "loupe.consumers.kafka.products_topics",  # Settings.products_topics()
    "loupe.consumers.kafka.reply_topics",  # the reply-to rule's default and refusal reasons
    "loupe.consumers.workers.image_fetch",  # Settings.fetch_policy()
    "loupe.consumers.index.interface",  # the index's topology and quantisation values
}


def _part(module: str) -> str | None:
    """The part of ``loupe.consumers`` that ``module`` belongs to (None: outside it)."""
    parts = module.split(".")
    if parts[:2] != ["loupe", "consumers"]:
        return None
    if len(parts) > 3 and parts[2] in CONSUMER_PARTS:
        return parts[2]
    if len(parts) == 3 and parts[2] in CONSUMER_PARTS:
        return parts[2]  # the subpackage itself
    return "common"


def test_the_services_parts_import_only_the_parts_below_them():
    problems = []
    for name, path in _modules().items():
        part = _part(name)
        if part is None:
            continue
        for imported in _imports(path, module_level_only=False):
            target = _part(imported)
            if target is None or target in CONSUMER_PARTS[part]:
                continue
            owner = ".".join(imported.split(".")[:4])
            if part == "common" and owner in COMMON_READS:
                continue
            problems.append(f"{name} ({part}) imports {imported} ({target})")
    assert not problems, "\n".join(problems)


def test_the_common_modules_read_only_leaf_modules_of_the_parts():
    """What settings, errors and metrics read of the parts imports nothing of the service
    itself but the common modules, so the parts stay layered above them."""
    modules = _modules()
    for leaf in COMMON_READS:
        for imported in _imports(modules[leaf], module_level_only=False):
            assert _part(imported) in (None, "common") or imported.startswith(
                tuple(COMMON_READS)
            ), f"{leaf} imports {imported}"


def test_the_parts_that_do_the_work_read_values_not_the_settings():
    """``Settings`` is read by the wiring (``service/``) and by the Kafka part, whose own
    section it is; the index and the workers are given what they need (a store, a policy, a
    topic) and never the whole flat declaration."""
    readers = sorted(
        name
        for name, path in _modules().items()
        if _part(name) in ("index", "workers")
        and any(i.startswith("loupe.consumers.settings") for i in _imports(path, False))
    )
    assert not readers, readers
