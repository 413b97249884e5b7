"""Static checks of deploy/: the files parse, agree with each other and with the product.

Nothing here starts a container or a cluster (Docker and Kubernetes are not available to the
test suite). What can be checked without them is checked: YAML and JSON parse; Kubernetes
objects are well formed and refer to each other correctly; compose's bind mounts exist;
every PromQL expression names only metrics pullthrough exports and is accepted by promtool;
the alert rules fire when they should (promtool unit tests); the systemd unit passes
`systemd-analyze verify`; the Dockerfile runs as non-root with a health check and a volume;
`haproxy -c` and `nginx -t` accept the fleet's balancer configs.

promtool (Debian's `prometheus` package), systemd-analyze (`systemd`), haproxy and nginx are
required:
`make system-deps` installs them. A missing tool fails the test rather than skipping it,
so a green run always means the files were checked.
"""

from __future__ import annotations

import json
import re
import shlex
import shutil
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml

from proxy.config import Config, parse_config
from tests.e2e.fleet import HAPROXY_CFG as FLEET_HAPROXY
from tests.e2e.fleet import haproxy_config

ROOT = Path(__file__).resolve().parents[2]
DEPLOY = ROOT / "deploy"
KUBERNETES = DEPLOY / "kubernetes"
PROMETHEUS = DEPLOY / "prometheus"
GRAFANA = DEPLOY / "grafana"
FLEET_NGINX = DEPLOY / "fleet" / "nginx.conf"
DASHBOARD = GRAFANA / "pullthrough.json"
UNIT = DEPLOY / "systemd" / "pullthrough.service"
ALERT_UNIT_TESTS = Path(__file__).with_name("alerts_test.yml")

# The metrics pullthrough exports (the lead's final list). Counters carry their `_total`.
METRICS = {
    "pullthrough_http_requests_total",
    "pullthrough_cache_requests_total",
    "pullthrough_served_bytes_total",
    "pullthrough_upstream_bytes_total",
    "pullthrough_upstream_errors_total",
    "pullthrough_upstream_breaker_state",
    "pullthrough_upstream_ratelimit_remaining",
    "pullthrough_token_fetches_total",
    "pullthrough_fills_in_progress",
    "pullthrough_cache_size_bytes",
    "pullthrough_cache_blobs",
    "pullthrough_cache_max_size_bytes",
    "pullthrough_evictions_total",
    "pullthrough_evicted_bytes_total",
    "pullthrough_disk_full_total",
    "pullthrough_digest_mismatches_total",
}
# Histograms exist only as their _bucket, _sum and _count series.
HISTOGRAMS = {
    "pullthrough_http_request_duration_seconds",
    "pullthrough_upstream_request_duration_seconds",
}
HISTOGRAM_SUFFIXES = ("_bucket", "_sum", "_count")

# The mirror's default shutdown_grace: SIGTERM lets in-flight responses finish this long.
# (The systemd unit has no config of its own to read it from.)
DEFAULT_SHUTDOWN_GRACE = 30.0
CACHE_PATH = "/var/lib/pullthrough"
CONFIG_PATH = "/etc/pullthrough/mirror.yaml"
PORT = 5000


# ---- helpers ----------------------------------------------------------------------------------


def require_tool(command: str, package: str) -> str:
    path = shutil.which(command)
    if path is None:
        pytest.fail(
            f"{command} is not installed: run `make system-deps` "
            f"(it installs Debian's {package} package)",
            pytrace=False,
        )
    return path


def run(*args: str | Path, cwd: Path | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [str(a) for a in args], capture_output=True, text=True, timeout=120, cwd=cwd, check=False
    )


def load_yaml_docs(path: Path) -> list[Any]:
    with path.open(encoding="utf-8") as f:
        return [doc for doc in yaml.safe_load_all(f) if doc is not None]


def load_yaml(path: Path) -> Any:
    docs = load_yaml_docs(path)
    assert len(docs) == 1, f"{path}: expected one YAML document, found {len(docs)}"
    return docs[0]


def yaml_files() -> list[Path]:
    return sorted(p for p in DEPLOY.rglob("*") if p.suffix in (".yml", ".yaml"))


def rel(path: Path) -> str:
    return str(path.relative_to(ROOT))


def k8s_objects() -> dict[str, dict[str, Any]]:
    """kind -> the one object of that kind under deploy/kubernetes."""
    objects: dict[str, dict[str, Any]] = {}
    for path in sorted(KUBERNETES.glob("*.yaml")):
        if path.name == "kustomization.yaml":
            continue
        for doc in load_yaml_docs(path):
            assert doc["kind"] not in objects, f"two {doc['kind']} objects"
            objects[doc["kind"]] = doc
    return objects


def pod_container() -> dict[str, Any]:
    containers = k8s_objects()["StatefulSet"]["spec"]["template"]["spec"]["containers"]
    assert len(containers) == 1
    container: dict[str, Any] = containers[0]
    return container


def mirror_config(text: str) -> Config:
    """Parse a mirror.yaml with the product's own parser; ${VAR}s get placeholder values."""
    env = {name: "placeholder" for name in re.findall(r"\$\{(\w+)\}", text)}
    return parse_config(yaml.safe_load(text), env=env)


def configmap_config() -> Config:
    return mirror_config(k8s_objects()["ConfigMap"]["data"]["mirror.yaml"])


def seconds(text: str) -> float:
    """`45s`, `1m30s`, `2min`, `45` (systemd and compose durations) -> seconds."""
    units = {"": 1, "s": 1, "sec": 1, "m": 60, "min": 60, "h": 3600}
    parts = re.findall(r"(\d+(?:\.\d+)?)\s*(min|sec|ms|s|m|h)?", str(text))
    assert parts, f"not a duration: {text!r}"
    total = 0.0
    for number, unit in parts:
        total += float(number) * (0.001 if unit == "ms" else units[unit])
    return total


def quantity_bytes(text: str) -> int:
    """A Kubernetes storage quantity (`60Gi`, `500M`) -> bytes."""
    match = re.fullmatch(r"(\d+)([KMGT]i?)?", text)
    assert match, f"unsupported quantity {text!r}"
    scale = {"": 1, "K": 10**3, "M": 10**6, "G": 10**9, "T": 10**12}
    scale |= {"Ki": 2**10, "Mi": 2**20, "Gi": 2**30, "Ti": 2**40}
    return int(match[1]) * scale[match[2] or ""]


_PROMQL_STRING = re.compile(r'"(?:[^"\\]|\\.)*"|\'(?:[^\'\\]|\\.)*\'|`[^`]*`')
_METRIC_TOKEN = re.compile(r"\bpullthrough_[a-z_]+")


def metric_names(expr: str) -> set[str]:
    """pullthrough_* names in a PromQL expression (string literals, i.e. label values, aside)."""
    return set(_METRIC_TOKEN.findall(_PROMQL_STRING.sub('""', expr)))


def unknown_metrics(expr: str) -> set[str]:
    unknown = set()
    for name in metric_names(expr):
        if name in METRICS:
            continue
        base = next((name[: -len(s)] for s in HISTOGRAM_SUFFIXES if name.endswith(s)), None)
        if base not in HISTOGRAMS:
            unknown.add(name)
    return unknown


def family(name: str) -> str:
    for suffix in HISTOGRAM_SUFFIXES:
        if name.endswith(suffix) and name[: -len(suffix)] in HISTOGRAMS:
            return name[: -len(suffix)]
    return name


def alert_rules() -> list[dict[str, Any]]:
    doc = load_yaml(PROMETHEUS / "alerts.yml")
    return [rule for group in doc["groups"] for rule in group["rules"]]


def dashboard() -> dict[str, Any]:
    loaded: dict[str, Any] = json.loads(DASHBOARD.read_text(encoding="utf-8"))
    return loaded


def panels(board: dict[str, Any]) -> Iterator[dict[str, Any]]:
    for panel in board["panels"]:
        yield panel
        yield from panel.get("panels", [])  # panels inside collapsed rows


def dashboard_exprs(board: dict[str, Any]) -> list[str]:
    return [t["expr"] for p in panels(board) for t in p.get("targets", []) if t.get("expr")]


def dashboard_variable_queries(board: dict[str, Any]) -> list[str]:
    queries = []
    for variable in board.get("templating", {}).get("list", []):
        if variable.get("type") != "query":
            continue
        query = variable.get("query")
        queries.append(query.get("query", "") if isinstance(query, dict) else str(query or ""))
        queries.append(str(variable.get("definition", "")))
    return [q for q in queries if q]


def compose() -> dict[str, Any]:
    loaded: dict[str, Any] = load_yaml(DEPLOY / "compose.yaml")
    return loaded


def compose_mounts(service: dict[str, Any]) -> list[tuple[str, str]]:
    """(source, target) of each volume entry, short or long syntax."""
    mounts = []
    for entry in service.get("volumes", []):
        if isinstance(entry, dict):
            mounts.append((str(entry.get("source", "")), str(entry["target"])))
        else:
            source, target = str(entry).split(":")[:2]
            mounts.append((source, target))
    return mounts


def is_bind(source: str) -> bool:
    return source.startswith((".", "/", "~"))


def dockerfile_instructions() -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments), continuation lines joined, comments dropped."""
    instructions: list[tuple[str, str]] = []
    pending = ""
    for raw in (DEPLOY / "Dockerfile").read_text(encoding="utf-8").splitlines():
        line = raw.strip()
        if line.startswith("#") or (not line and not pending):
            continue
        if line.endswith("\\"):
            pending += line[:-1] + " "
            continue
        line = pending + line
        pending = ""
        keyword, _, args = line.partition(" ")
        instructions.append((keyword.upper(), args.strip()))
    assert not pending, "Dockerfile ends in a continuation line"
    return instructions


def dockerfile_values(keyword: str) -> list[str]:
    return [args for kw, args in dockerfile_instructions() if kw == keyword]


def dockerfile_env() -> dict[str, str]:
    env = {}
    for args in dockerfile_values("ENV"):
        for item in shlex.split(args):
            name, _, value = item.partition("=")
            env[name] = value
    return env


def exec_form(args: str) -> list[str]:
    parsed = json.loads(args)
    assert isinstance(parsed, list), f"not exec (JSON) form: {args}"
    return [str(a) for a in parsed]


def unit_settings() -> dict[str, dict[str, list[str]]]:
    """section -> key -> every value (systemd keys may repeat)."""
    sections: dict[str, dict[str, list[str]]] = {}
    current: dict[str, list[str]] = {}
    for raw in UNIT.read_text(encoding="utf-8").splitlines():
        line = raw.strip()
        if not line or line.startswith(("#", ";")):
            continue
        if line.startswith("["):
            current = sections.setdefault(line.strip("[]"), {})
            continue
        key, _, value = line.partition("=")
        current.setdefault(key.strip(), []).append(value.strip())
    return sections


# ---- every YAML file ------------------------------------------------------------------------


@pytest.mark.parametrize("path", yaml_files(), ids=rel)
def test_yaml_parses(path: Path) -> None:
    docs = load_yaml_docs(path)
    assert docs, f"{rel(path)} holds no YAML document"
    assert all(isinstance(doc, dict) for doc in docs), f"{rel(path)}: a document is not a mapping"


def test_yaml_files_were_found() -> None:
    names = {rel(p) for p in yaml_files()}
    assert "deploy/compose.yaml" in names
    assert "deploy/kubernetes/statefulset.yaml" in names


# ---- Kubernetes -------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "path", sorted(p for p in KUBERNETES.glob("*.yaml") if p.name != "kustomization.yaml"), ids=rel
)
def test_kubernetes_objects_have_apiversion_kind_and_name(path: Path) -> None:
    for doc in load_yaml_docs(path):
        assert isinstance(doc.get("apiVersion"), str) and doc["apiVersion"], rel(path)
        assert isinstance(doc.get("kind"), str) and doc["kind"], rel(path)
        assert isinstance(doc.get("metadata", {}).get("name"), str), rel(path)
        assert doc["metadata"]["name"], rel(path)


def test_kustomization_lists_every_manifest() -> None:
    kustomization = load_yaml(KUBERNETES / "kustomization.yaml")
    assert kustomization["apiVersion"] == "kustomize.config.k8s.io/v1beta1"
    assert kustomization["kind"] == "Kustomization"
    resources = kustomization["resources"]
    for resource in resources:
        assert (KUBERNETES / resource).is_file(), f"kustomization names missing {resource}"
    manifests = {p.name for p in KUBERNETES.glob("*.yaml")} - {"kustomization.yaml"}
    assert set(resources) == manifests, "every manifest in deploy/kubernetes is a resource"
    images = {image["name"] for image in kustomization.get("images", [])}
    assert pod_container()["image"].split(":")[0] in images, "kustomize sets the pod's image"


def test_expected_kubernetes_objects() -> None:
    assert set(k8s_objects()) == {"StatefulSet", "Service", "ConfigMap", "ServiceMonitor"}
    assert k8s_objects()["StatefulSet"]["apiVersion"] == "apps/v1"
    assert k8s_objects()["ServiceMonitor"]["apiVersion"] == "monitoring.coreos.com/v1"


def test_configmap_holds_a_valid_mirror_config() -> None:
    config = configmap_config()  # the product's own parser: raises ConfigError if bad
    assert config.listen_port == PORT
    assert config.shutdown_grace == DEFAULT_SHUTDOWN_GRACE
    assert str(config.cache.path) == CACHE_PATH
    assert config.default_upstream is not None


def test_statefulset_runs_one_replica_behind_its_service() -> None:
    objects = k8s_objects()
    spec = objects["StatefulSet"]["spec"]
    assert spec["replicas"] == 1, "one process owns the cache and its SQLite index"
    assert spec["serviceName"] == objects["Service"]["metadata"]["name"]
    pod_labels = spec["template"]["metadata"]["labels"]
    assert spec["selector"]["matchLabels"].items() <= pod_labels.items()


def test_statefulset_probes() -> None:
    container = pod_container()
    ports = {p["name"]: p["containerPort"] for p in container["ports"]}
    assert ports == {"http": PORT}
    readiness = container["readinessProbe"]["httpGet"]
    liveness = container["livenessProbe"]["httpGet"]
    assert readiness["path"] == "/readyz"
    assert liveness["path"] == "/healthz"
    for probe in ("readinessProbe", "livenessProbe", "startupProbe"):
        if probe in container:
            assert container[probe]["httpGet"]["port"] in ports, f"{probe} names a known port"


def test_statefulset_grace_period_exceeds_shutdown_grace() -> None:
    pod = k8s_objects()["StatefulSet"]["spec"]["template"]["spec"]
    assert pod["terminationGracePeriodSeconds"] > configmap_config().shutdown_grace


def test_statefulset_security_context() -> None:
    pod = k8s_objects()["StatefulSet"]["spec"]["template"]["spec"]
    container = pod_container()
    assert pod["securityContext"]["runAsNonRoot"] is True
    assert pod["securityContext"]["runAsUser"] != 0
    assert pod["securityContext"]["fsGroup"] == pod["securityContext"]["runAsGroup"]
    context = container["securityContext"]
    assert context["readOnlyRootFilesystem"] is True
    assert context["allowPrivilegeEscalation"] is False
    assert context["capabilities"]["drop"] == ["ALL"]
    # The Dockerfile's numeric USER and the pod's user are the same account.
    user = dockerfile_values("USER")[-1].split(":")
    assert int(user[0]) == pod["securityContext"]["runAsUser"]
    assert int(user[1]) == pod["securityContext"]["runAsGroup"]


def test_statefulset_resources() -> None:
    resources = pod_container()["resources"]
    assert {"cpu", "memory"} <= set(resources["requests"])
    assert "memory" in resources["limits"]


def test_statefulset_cache_volume_is_the_writable_cache() -> None:
    spec = k8s_objects()["StatefulSet"]["spec"]
    container = pod_container()
    env = {e["name"]: e.get("value") for e in container.get("env", [])}
    assert env["PULLTHROUGH_CACHE__PATH"] == CACHE_PATH
    mounts = {m["mountPath"]: m for m in container["volumeMounts"]}
    claims = {t["metadata"]["name"]: t for t in spec["volumeClaimTemplates"]}
    cache_mount = mounts[CACHE_PATH]
    assert cache_mount["name"] in claims, "the cache is a volumeClaimTemplate"
    assert not cache_mount.get("readOnly", False)
    # The volume must hold the cache's budget with room to spare for in-flight downloads.
    claim = claims[cache_mount["name"]]["spec"]
    assert quantity_bytes(claim["resources"]["requests"]["storage"]) >= 1.1 * (
        configmap_config().cache.max_size
    )
    # Besides the cache (and an emptyDir /tmp), nothing the container mounts is writable.
    pod_volumes = {v["name"]: v for v in spec["template"]["spec"].get("volumes", [])}
    for path, mount in mounts.items():
        if path in (CACHE_PATH, "/tmp"):
            continue
        assert mount.get("readOnly") is True, f"{path} should be mounted read-only"
    if "/tmp" in mounts:
        assert "emptyDir" in pod_volumes[mounts["/tmp"]["name"]]


def test_statefulset_mounts_the_configmap_where_the_args_point() -> None:
    objects = k8s_objects()
    container = pod_container()
    pod = objects["StatefulSet"]["spec"]["template"]["spec"]
    pod_volumes = {v["name"]: v for v in pod["volumes"]}
    config_dir = str(Path(CONFIG_PATH).parent)
    mount = next(m for m in container["volumeMounts"] if m["mountPath"] == config_dir)
    configmap = objects["ConfigMap"]
    assert pod_volumes[mount["name"]]["configMap"]["name"] == configmap["metadata"]["name"]
    assert Path(CONFIG_PATH).name in configmap["data"]
    args = container["args"]
    assert args[args.index("--config") + 1] == CONFIG_PATH


def test_service_selects_the_pod_and_port() -> None:
    objects = k8s_objects()
    service = objects["Service"]["spec"]
    pod_labels = objects["StatefulSet"]["spec"]["template"]["metadata"]["labels"]
    assert service["selector"].items() <= pod_labels.items()
    container_ports = {p["name"]: p["containerPort"] for p in pod_container()["ports"]}
    for port in service["ports"]:
        target = port["targetPort"]
        assert target in container_ports or target in container_ports.values()
    assert objects["Service"]["metadata"]["name"] == "pullthrough", "alerts match job=pullthrough"


def test_servicemonitor_scrapes_the_service() -> None:
    objects = k8s_objects()
    monitor = objects["ServiceMonitor"]["spec"]
    service = objects["Service"]
    assert monitor["selector"]["matchLabels"].items() <= service["metadata"]["labels"].items()
    service_ports = {p["name"] for p in service["spec"]["ports"]}
    for endpoint in monitor["endpoints"]:
        assert endpoint["port"] in service_ports
        assert endpoint.get("path", "/metrics") == "/metrics"


# ---- compose ----------------------------------------------------------------------------------


def test_compose_has_the_three_services() -> None:
    assert set(compose()["services"]) == {"mirror", "prometheus", "grafana"}


def test_compose_bind_mount_sources_exist() -> None:
    project = compose()
    named = set(project.get("volumes") or {})
    for name, service in project["services"].items():
        for source, target in compose_mounts(service):
            assert target.startswith("/"), f"{name}: {target} is not an absolute path"
            if is_bind(source):
                path = (DEPLOY / source).resolve()
                assert path.exists(), f"{name}: bind mount source {source} does not exist"
            else:
                assert source in named, f"{name}: volume {source} is not declared"


def test_compose_builds_the_mirror_from_the_dockerfile() -> None:
    mirror = compose()["services"]["mirror"]
    context = (DEPLOY / mirror["build"]["context"]).resolve()
    assert context == ROOT, "the build context is the repository root"
    assert (context / mirror["build"]["dockerfile"]).resolve() == DEPLOY / "Dockerfile"
    assert f"{PORT}:{PORT}" in [str(p) for p in mirror["ports"]]
    mounts = dict((t, s) for s, t in compose_mounts(mirror))
    assert CONFIG_PATH in mounts, "compose mounts a config where the image reads it"
    config = mirror_config((DEPLOY / mounts[CONFIG_PATH]).read_text(encoding="utf-8"))
    assert config.listen_port == PORT
    cache = mounts[CACHE_PATH]
    assert not is_bind(cache), "the cache is a named volume"
    assert mirror["environment"]["PULLTHROUGH_CACHE__PATH"] == CACHE_PATH
    assert seconds(mirror["stop_grace_period"]) > config.shutdown_grace


def test_compose_prometheus_loads_the_config_and_rules() -> None:
    prometheus = compose()["services"]["prometheus"]
    mounts = {(DEPLOY / s).resolve(): t for s, t in compose_mounts(prometheus) if is_bind(s)}
    config_target = mounts[PROMETHEUS / "prometheus.yml"]
    assert f"--config.file={config_target}" in prometheus["command"]
    # rule_files are relative to prometheus.yml, in the repository and in the container alike.
    config = load_yaml(PROMETHEUS / "prometheus.yml")
    for rule_file in config["rule_files"]:
        assert (PROMETHEUS / rule_file).is_file()
        in_container = str(Path(config_target).parent / rule_file)
        assert in_container in mounts.values(), f"{rule_file} is not mounted next to the config"
    # The scrape target is the mirror service on its port.
    targets = [
        target
        for job in config["scrape_configs"]
        if job["job_name"] == "pullthrough"
        for static in job["static_configs"]
        for target in static["targets"]
    ]
    assert targets == [f"mirror:{PORT}"]


def test_compose_grafana_is_provisioned() -> None:
    grafana = compose()["services"]["grafana"]
    mounts = {(DEPLOY / s).resolve(): t for s, t in compose_mounts(grafana) if is_bind(s)}
    assert mounts[GRAFANA / "provisioning"] == "/etc/grafana/provisioning"
    provider = load_yaml(GRAFANA / "provisioning" / "dashboards" / "pullthrough.yml")
    (entry,) = provider["providers"]
    assert entry["type"] == "file"
    assert str(Path(mounts[DASHBOARD]).parent) == entry["options"]["path"]
    sources = load_yaml(GRAFANA / "provisioning" / "datasources" / "prometheus.yml")
    (source,) = sources["datasources"]
    assert source["type"] == "prometheus"
    assert source["url"] == "http://prometheus:9090"
    assert "prometheus" in compose()["services"]


def test_compose_images_are_pinned() -> None:
    for name, service in compose()["services"].items():
        if "build" in service:
            continue
        image = service["image"]
        tag = image.rsplit("/", 1)[-1].partition(":")[2]
        assert tag and tag != "latest", f"{name}: pin {image} to a version"


# ---- Prometheus -------------------------------------------------------------------------------


def test_promtool_check_config() -> None:
    promtool = require_tool("promtool", "prometheus")
    result = run(promtool, "check", "config", PROMETHEUS / "prometheus.yml")
    assert result.returncode == 0, result.stdout + result.stderr


def test_promtool_check_rules() -> None:
    promtool = require_tool("promtool", "prometheus")
    result = run(promtool, "check", "rules", PROMETHEUS / "alerts.yml")
    assert result.returncode == 0, result.stdout + result.stderr


def test_alerts_fire_when_they_should(tmp_path: Path) -> None:
    """promtool unit tests (tests/deploy/alerts_test.yml) against the rules' expressions."""
    promtool = require_tool("promtool", "prometheus")
    rules = load_yaml(PROMETHEUS / "alerts.yml")
    for group in rules["groups"]:
        for rule in group["rules"]:
            rule.pop("annotations", None)  # promtool would compare them verbatim
    (tmp_path / "alerts.yml").write_text(yaml.safe_dump(rules, sort_keys=False))
    shutil.copy(ALERT_UNIT_TESTS, tmp_path / "alerts_test.yml")
    result = run(promtool, "test", "rules", "alerts_test.yml", cwd=tmp_path)
    assert result.returncode == 0, result.stdout + result.stderr
    tested = {
        case["alertname"]
        for test in load_yaml(ALERT_UNIT_TESTS)["tests"]
        for case in test.get("alert_rule_test", [])
    }
    assert tested == {r["alert"] for r in alert_rules()}, "every alert has a unit test"


def test_alerts_have_severity_and_annotations() -> None:
    rules = alert_rules()
    assert rules
    for rule in rules:
        assert "alert" in rule, "alerts.yml holds alerting rules only"
        assert rule["labels"]["severity"] in ("critical", "warning"), rule["alert"]
        assert rule["annotations"]["summary"].strip(), rule["alert"]
        assert rule["annotations"]["description"].strip(), rule["alert"]
    names = [r["alert"] for r in rules]
    assert len(names) == len(set(names)), "alert names are unique"


def test_alerts_cover_the_required_conditions() -> None:
    used = {family(name) for rule in alert_rules() for name in metric_names(rule["expr"])}
    required = {
        "pullthrough_cache_requests_total",  # hit ratio
        "pullthrough_upstream_errors_total",
        "pullthrough_upstream_breaker_state",
        "pullthrough_cache_size_bytes",
        "pullthrough_cache_max_size_bytes",
        "pullthrough_digest_mismatches_total",
        "pullthrough_disk_full_total",
    }
    assert required <= used, f"no alert uses {sorted(required - used)}"


def test_alert_expressions_name_only_exported_metrics() -> None:
    for rule in alert_rules():
        assert metric_names(rule["expr"]) or "up{" in rule["expr"], rule["alert"]
        assert not unknown_metrics(rule["expr"]), f"{rule['alert']}: unknown metric"


def test_metric_name_check_catches_unknown_names() -> None:
    assert unknown_metrics("rate(pullthrough_stale_total[5m])") == {"pullthrough_stale_total"}
    assert unknown_metrics("pullthrough_disk_full_events") == {"pullthrough_disk_full_events"}
    assert unknown_metrics("pullthrough_cache_size_bytes_bucket") == {
        "pullthrough_cache_size_bytes_bucket"
    }
    assert not unknown_metrics(
        "histogram_quantile(0.5, rate(pullthrough_upstream_request_duration_seconds_bucket[5m]))"
        ' + pullthrough_http_request_duration_seconds_count{route="pullthrough_nonsense"}'
    )


# ---- Grafana ----------------------------------------------------------------------------------


def test_dashboard_uses_the_templated_datasource() -> None:
    board = dashboard()
    variables = {v["name"]: v for v in board["templating"]["list"]}
    assert variables["DS_PROMETHEUS"]["type"] == "datasource"
    assert variables["DS_PROMETHEUS"]["query"] == "prometheus"
    assert "__inputs" not in board, "file provisioning cannot fill __inputs"
    ids = [p["id"] for p in panels(board)]
    assert len(ids) == len(set(ids)), "panel ids are unique"
    for panel in panels(board):
        if panel["type"] == "row":
            continue
        title = panel["title"]
        assert panel["datasource"] == {"type": "prometheus", "uid": "${DS_PROMETHEUS}"}, title
        assert panel["targets"], f"{title} has no query"
        for target in panel["targets"]:
            assert target["expr"].strip(), title
            assert target.get("datasource", panel["datasource"]) == panel["datasource"]
        assert {"x", "y", "w", "h"} <= set(panel["gridPos"])


def test_dashboard_has_the_required_panels() -> None:
    titles = {p["title"].lower() for p in panels(dashboard())}
    for wanted in (
        "hit ratio (requests)",
        "hit ratio (bytes)",
        "bytes served by source",
        "upstream latency p50 / p95",
        "upstream errors by class",
        "circuit breaker",
        "cache size vs budget",
        "evictions by reason",
        "fills in progress",
    ):
        assert wanted in titles, f"no {wanted!r} panel"


def test_dashboard_expressions_name_only_exported_metrics() -> None:
    board = dashboard()
    for expr in dashboard_exprs(board) + dashboard_variable_queries(board):
        assert not unknown_metrics(expr), f"unknown metric in {expr!r}"


def test_dashboard_shows_every_exported_metric() -> None:
    board = dashboard()
    used = {family(name) for expr in dashboard_exprs(board) for name in metric_names(expr)}
    missing = (METRICS | HISTOGRAMS) - used
    assert not missing, f"the dashboard does not show {sorted(missing)}"


def test_dashboard_expressions_are_valid_promql(tmp_path: Path) -> None:
    """Each panel query, with Grafana's variables filled in, loaded as a recording rule."""
    promtool = require_tool("promtool", "prometheus")
    rules = []
    for i, expr in enumerate(dashboard_exprs(dashboard())):
        expr = re.sub(r"\$__(rate_interval|interval|range)\b", "5m", expr)
        expr = re.sub(r"\$\{?\w+\}?", ".*", expr)  # template variables, used as regexes
        rules.append({"record": f"dashboard_query_{i}", "expr": expr})
    assert rules
    path = tmp_path / "dashboard_rules.yml"
    path.write_text(yaml.safe_dump({"groups": [{"name": "dashboard", "rules": rules}]}))
    result = run(promtool, "check", "rules", path)
    assert result.returncode == 0, result.stdout + result.stderr


# ---- systemd ----------------------------------------------------------------------------------


def test_systemd_unit_verifies(tmp_path: Path) -> None:
    """`systemd-analyze verify`, with ExecStart's binary stubbed (it is not installed here)."""
    analyze = require_tool("systemd-analyze", "systemd")
    stub = tmp_path / "pullthrough"
    stub.write_text("#!/bin/sh\nexit 0\n")
    stub.chmod(0o755)
    text = UNIT.read_text(encoding="utf-8")
    exec_start = re.search(r"^ExecStart=(\S+)", text, re.MULTILINE)
    assert exec_start is not None
    unit = tmp_path / UNIT.name
    unit.write_text(text.replace(f"ExecStart={exec_start[1]}", f"ExecStart={stub}", 1))
    result = run(analyze, "verify", unit)
    output = (result.stdout + result.stderr).strip()
    assert result.returncode == 0 and not output, output


def test_systemd_unit_sandbox_exposure() -> None:
    """`systemd-analyze security` rates the sandbox; 20 on its 0-100 scale is "OK"."""
    analyze = require_tool("systemd-analyze", "systemd")
    result = run(analyze, "security", "--offline=true", "--threshold=20", "--no-pager", UNIT)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr


def test_systemd_unit_settings() -> None:
    unit = unit_settings()
    service = {key: values[-1] for key, values in unit["Service"].items()}
    assert service.get("DynamicUser") == "yes" or service.get("User")
    assert service["StateDirectory"] == "pullthrough"
    environment = unit["Service"]["Environment"]
    assert f"PULLTHROUGH_CACHE__PATH=%S/{service['StateDirectory']}" in environment
    assert service["EnvironmentFile"] == "-/etc/pullthrough/env"
    command = service["ExecStart"].split()
    assert command[1:] == ["serve", "--config", CONFIG_PATH]
    assert service["Restart"] == "on-failure"
    assert service["ExecReload"] == "/bin/kill -HUP $MAINPID"  # serve reloads on SIGHUP
    assert seconds(service["TimeoutStopSec"]) > DEFAULT_SHUTDOWN_GRACE
    for key, value in {
        "ProtectSystem": "strict",
        "ProtectHome": "yes",
        "PrivateTmp": "yes",
        "NoNewPrivileges": "yes",
        "CapabilityBoundingSet": "",
        "RestrictAddressFamilies": "AF_INET AF_INET6 AF_UNIX",
        "LockPersonality": "yes",
        "ProtectKernelTunables": "yes",
        "ProtectKernelModules": "yes",
        "ProtectControlGroups": "yes",
    }.items():
        assert service.get(key) == value, f"{key}={value}"
    assert "@system-service" in unit["Service"]["SystemCallFilter"]
    assert unit["Install"]["WantedBy"] == ["multi-user.target"]


# ---- Dockerfile -------------------------------------------------------------------------------


def test_dockerfile_base_images_are_pinned() -> None:
    args = {}
    stages = set()
    for keyword, value in dockerfile_instructions():
        if keyword == "ARG" and "=" in value:
            name, _, default = value.partition("=")
            args[name] = default
        if keyword == "FROM":
            words = value.split()
            image = re.sub(r"\$\{?(\w+)\}?", lambda m: args.get(m[1], m[0]), words[0])
            if len(words) >= 3 and words[1].upper() == "AS":
                stages.add(words[2])
            if image in stages:
                continue
            tag = image.rsplit("/", 1)[-1].partition(":")[2].partition("@")[0]
            assert "$" not in image, f"FROM {words[0]}: no default for the ARG"
            assert tag and tag != "latest", f"FROM {image}: pin a version tag, not :latest"
            assert "slim" in tag, f"FROM {image}: use a slim base"


def test_dockerfile_runs_as_non_root() -> None:
    users = dockerfile_values("USER")
    assert users, "no USER: the mirror would run as root"
    user = users[-1].split(":")[0]
    assert user not in ("root", "0"), "the last USER is root"
    assert user.isdigit(), "a numeric USER lets Kubernetes' runAsNonRoot verify it"


def test_dockerfile_healthcheck_hits_healthz() -> None:
    (healthcheck,) = dockerfile_values("HEALTHCHECK")
    _, _, command = healthcheck.partition("CMD ")
    argv = exec_form(command)
    assert argv[0] == "python", "slim images have no curl"
    code = argv[argv.index("-c") + 1]
    compile(code, "HEALTHCHECK", "exec")
    assert f"127.0.0.1:{PORT}/healthz" in code


def test_dockerfile_cache_volume_config_and_signal() -> None:
    env = dockerfile_env()
    assert env["PULLTHROUGH_CACHE__PATH"] == CACHE_PATH
    volumes = [v for value in dockerfile_values("VOLUME") for v in exec_form(value)]
    assert CACHE_PATH in volumes
    assert dockerfile_values("STOPSIGNAL") == ["SIGTERM"]
    assert str(PORT) in dockerfile_values("EXPOSE")
    command = exec_form(dockerfile_values("ENTRYPOINT")[-1]) + exec_form(
        dockerfile_values("CMD")[-1]
    )
    assert command == ["pullthrough", "serve", "--config", CONFIG_PATH]
    copied = [value.split() for value in dockerfile_values("COPY")]
    assert any(words[-1] == CONFIG_PATH for words in copied), "a default config is baked in"


def test_dockerfile_copies_existing_files() -> None:
    for value in dockerfile_values("COPY"):
        words = value.split()
        if any(w.startswith("--from") for w in words):
            continue
        for source in [w for w in words[:-1] if not w.startswith("--")]:
            assert (ROOT / source).exists(), f"COPY {source}: not in the build context"


# ---- fleet (HAProxy, nginx) -------------------------------------------------------------------


def test_fleet_haproxy_config_is_valid(tmp_path: Path) -> None:
    """`haproxy -c` accepts the shipped config as it is, and with real addresses without a
    single warning (as shipped, only the placeholder names' failed lookups warn)."""
    haproxy = require_tool("haproxy", "haproxy")
    shipped = run(haproxy, "-c", "-f", FLEET_HAPROXY)
    assert shipped.returncode == 0, shipped.stdout + shipped.stderr
    servers = [f"127.0.0.1:{5000 + i}" for i in range(3)]
    config = tmp_path / "haproxy.cfg"
    config.write_text(haproxy_config(servers, port=5000, stats_port=8404))
    result = run(haproxy, "-c", "-f", config)
    output = result.stdout + result.stderr
    assert result.returncode == 0, output
    assert "[WARNING]" not in output and "[ALERT]" not in output, output


def test_fleet_haproxy_routes_by_the_documented_key() -> None:
    text = FLEET_HAPROXY.read_text(encoding="utf-8")
    lines = {line.strip() for line in text.splitlines()}
    assert {
        "acl by_digest path_reg /sha256:[0-9a-f]{64}$",
        "http-request set-var(txn.key) path,field(-1,/) if by_digest",
        "http-request set-var(txn.key) url_param(ns),concat(,txn.key) if has_ns",
        "balance hash var(txn.key)",
        "hash-type consistent",
        "option redispatch 1",
        "http-check send meth GET uri /readyz",
    } <= lines
    (retry_on,) = [line.split()[1:] for line in lines if line.startswith("retry-on ")]
    assert "conn-failure" in retry_on


def test_fleet_nginx_config_is_valid(tmp_path: Path) -> None:
    """`nginx -t` on the shipped config with the placeholder replicas on 127.0.0.1 (nginx
    refuses names it cannot resolve)."""
    nginx = require_tool("nginx", "nginx")
    text = FLEET_NGINX.read_text(encoding="utf-8")
    text, servers = re.subn(r"server pullthrough-(\d):5000", r"server 127.0.0.1:500\1", text)
    assert servers == 3
    config = tmp_path / "nginx.conf"
    config.write_text(text)
    pid = f"pid {tmp_path / 'nginx.pid'};"
    result = run(nginx, "-t", "-p", tmp_path, "-c", config, "-e", "stderr", "-g", pid)
    assert result.returncode == 0, result.stdout + result.stderr


def test_fleet_nginx_routes_by_the_documented_key() -> None:
    lines = {line.strip() for line in FLEET_NGINX.read_text(encoding="utf-8").splitlines()}
    assert {
        '"~/(sha256:[0-9a-f]{64})$" $1;',
        '"" "$arg_ns$uri";',
        "default $pullthrough_digest;",
        "hash $pullthrough_key consistent;",
    } <= lines
