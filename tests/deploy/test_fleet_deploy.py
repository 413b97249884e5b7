"""Static checks of deploy/fleet/: the compose fleet, its Prometheus config and the
Kubernetes manifests, the way test_deploy.py checks the rest of deploy/ (and with its
helpers). Nothing here starts a container or a cluster.

What must hold for a fleet to act as one cache, and is checked here:
- each replica has its own cache volume, and the balancer's servers are exactly the
  replicas (compose services, StatefulSet pods), in a fixed order;
- every balancer computes the same routing key: the Kubernetes HAProxy config is
  deploy/fleet/haproxy.cfg but for its server lines, and the ingress-nginx http-snippet
  holds deploy/fleet/nginx.conf's maps verbatim;
- Prometheus scrapes every replica, under the job name the alerts expect;
- `haproxy -c`, `nginx -t` and `promtool check config` accept what would run.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
from collections.abc import Iterator
from ipaddress import ip_network
from pathlib import Path
from typing import Any

import pytest

from tests.deploy.test_deploy import (
    CACHE_PATH,
    CONFIG_PATH,
    DEPLOY,
    FLEET_NGINX,
    PORT,
    ROOT,
    compose_mounts,
    is_bind,
    load_yaml,
    load_yaml_docs,
    mirror_config,
    rel,
    require_tool,
    run,
    seconds,
)
from tests.e2e.fleet import HAPROXY_CFG as FLEET_HAPROXY

FLEET = DEPLOY / "fleet"
FLEET_COMPOSE = FLEET / "compose.yaml"
FLEET_MIRROR = FLEET / "mirror.yaml"
FLEET_PROMETHEUS = FLEET / "prometheus.yml"
KUBERNETES = FLEET / "kubernetes"
# A strategic-merge patch for the ingress-nginx controller's own ConfigMap: not an object of
# ours, so no kustomization lists it.
CONTROLLER_PATCH = KUBERNETES / "ingress-nginx" / "controller-configmap-patch.yaml"
HAPROXY_CONFIG_DIR = "/usr/local/etc/haproxy"  # where the official image reads haproxy.cfg
REPLICAS = 3
ALERTS_JOB = "pullthrough"  # deploy/prometheus/alerts.yml: up{job="pullthrough"}
# ingress-nginx's validation of the upstream-hash-by annotation (its upstreamhashby package).
HASH_BY_ALLOWED = re.compile(r"^[A-Za-z0-9\-_${}]*$")

_SERVER = re.compile(r"^\s*server\s+(\S+)\s+(\S+)", re.MULTILINE)


# ---- helpers --------------------------------------------------------------------------------


def compose() -> dict[str, Any]:
    """The fleet's compose file; PyYAML resolves the `<<: *replica` merge keys as Compose does."""
    loaded: dict[str, Any] = load_yaml(FLEET_COMPOSE)
    return loaded


def replica_services() -> dict[str, dict[str, Any]]:
    services = compose()["services"]
    return {n: s for n, s in services.items() if re.fullmatch(r"pullthrough-\d+", n)}


def mounts_by_target(service: dict[str, Any]) -> dict[str, str]:
    return {target: source for source, target in compose_mounts(service)}


def bind_source(service: dict[str, Any], target: str) -> Path:
    source = mounts_by_target(service)[target]
    assert is_bind(source), f"{target} is not a bind mount"
    return (FLEET / source).resolve()


def read_only_binds(service: dict[str, Any]) -> set[str]:
    return {
        str(entry).split(":")[1]
        for entry in service.get("volumes", [])
        if isinstance(entry, str) and entry.endswith(":ro")
    }


def haproxy_servers(text: str) -> list[tuple[str, str]]:
    """(name, address) of each `server` line, in order."""
    return [(m[1], m[2].strip('"')) for m in _SERVER.finditer(text)]


def config_lines(text: str) -> list[str]:
    """The configuration itself: comments and blank lines dropped, indentation kept."""
    return [line.rstrip() for line in text.splitlines() if line.strip() and not is_comment(line)]


def is_comment(line: str) -> bool:
    return line.lstrip().startswith("#")


def without_servers(lines: list[str]) -> list[str]:
    return [line for line in lines if not line.lstrip().startswith("server ")]


def haproxy_section(text: str, header: str) -> list[str]:
    """The lines of one section (`frontend registry`, `backend replicas`, ...)."""
    lines = config_lines(text)
    start = lines.index(header)
    end = next((i for i in range(start + 1, len(lines)) if not lines[i][0].isspace()), None)
    return lines[start + 1 : end]


def kustomize(directory: Path) -> Iterator[tuple[Path, dict[str, Any]]]:
    """(file, object) for every object a kustomization builds: its resources, and the
    resources of the kustomizations it names (what `kubectl kustomize` would load)."""
    kustomization = load_yaml(directory / "kustomization.yaml")
    assert kustomization["apiVersion"] == "kustomize.config.k8s.io/v1beta1"
    assert kustomization["kind"] == "Kustomization"
    for resource in kustomization["resources"]:
        path = (directory / resource).resolve()
        assert path.exists(), f"{rel(directory)}: no resource {resource}"
        if path.is_dir():
            yield from kustomize(path)
        else:
            for doc in load_yaml_docs(path):
                yield path, doc


def objects(overlay: str = "haproxy") -> dict[tuple[str, str], dict[str, Any]]:
    """(kind, name) -> object, for one overlay of deploy/fleet/kubernetes."""
    built: dict[tuple[str, str], dict[str, Any]] = {}
    for _, doc in kustomize(KUBERNETES / overlay):
        key = (doc["kind"], doc["metadata"]["name"])
        assert key not in built, f"{overlay}: two {key}"
        built[key] = doc
    return built


def only(overlay: str, kind: str) -> dict[str, Any]:
    (found,) = [doc for (k, _), doc in objects(overlay).items() if k == kind]
    return found


def statefulset() -> dict[str, Any]:
    return only("haproxy", "StatefulSet")


def container(workload: dict[str, Any]) -> dict[str, Any]:
    (found,) = workload["spec"]["template"]["spec"]["containers"]
    assert isinstance(found, dict)
    return found


def service(name: str) -> dict[str, Any]:
    return objects("haproxy")[("Service", name)]


def configmap_text(name: str, key: str, overlay: str = "haproxy") -> str:
    text = objects(overlay)[("ConfigMap", name)]["data"][key]
    assert isinstance(text, str)
    return text


def replica_config_text() -> str:
    return configmap_text("pullthrough-config", Path(CONFIG_PATH).name)


def balancer() -> dict[str, Any]:
    return objects("haproxy")[("Deployment", "pullthrough-balancer")]


def balancer_haproxy_cfg() -> str:
    pod = balancer()["spec"]["template"]["spec"]
    mount = next(
        m for m in container(balancer())["volumeMounts"] if m["mountPath"] == HAPROXY_CONFIG_DIR
    )
    (volume,) = [v for v in pod["volumes"] if v["name"] == mount["name"]]
    return configmap_text(volume["configMap"]["name"], "haproxy.cfg")


def container_env(workload: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return {e["name"]: e for e in container(workload).get("env", [])}


def prestop_sleep(workload: dict[str, Any]) -> float:
    command = container(workload)["lifecycle"]["preStop"]["exec"]["command"]
    assert command[0] == "sleep", command
    return float(command[1])


def labels_select(selector: dict[str, str], labels: dict[str, str]) -> bool:
    return selector.items() <= labels.items()


def nginx_maps(text: str) -> list[list[str]]:
    """Each `map` block, as its stripped lines (indentation differs between the files)."""
    blocks = re.findall(r"^[ \t]*map .*?^[ \t]*}[ \t]*$", text, re.MULTILINE | re.DOTALL)
    return [[line.strip() for line in block.splitlines()] for block in blocks]


def http_snippet() -> str:
    text = load_yaml(CONTROLLER_PATCH)["data"]["http-snippet"]
    assert isinstance(text, str)
    return text


def ingress() -> dict[str, Any]:
    return only("ingress-nginx", "Ingress")


def hash_by() -> str:
    value = ingress()["metadata"]["annotations"]["nginx.ingress.kubernetes.io/upstream-hash-by"]
    assert isinstance(value, str)
    return value


def render_ingress_nginx(tmp_path: Path, key: str) -> subprocess.CompletedProcess[str]:
    """`nginx -t` on the http-snippet plus an upstream hashed by the annotation's value.
    nginx's own `hash` stands in for ingress-nginx's Lua balancer, which reads the same
    variable; the replicas are on loopback because nginx -t resolves server names."""
    nginx = require_tool("nginx", "nginx")
    snippet = "\n".join("    " + line for line in http_snippet().splitlines())
    servers = "".join(f"        server 127.0.0.1:{PORT + i};\n" for i in range(REPLICAS))
    config = tmp_path / "nginx.conf"
    config.write_text(
        "events {}\n"
        "http {\n"
        f"{snippet}\n"
        "    upstream pullthrough {\n"
        f"        hash {key} consistent;\n"
        f"{servers}"
        "    }\n"
        "    server {\n"
        f"        listen 127.0.0.1:{PORT};\n"
        "        location / { proxy_pass http://pullthrough; }\n"
        "    }\n"
        "}\n"
    )
    pid = f"pid {tmp_path / 'nginx.pid'};"
    return run(nginx, "-t", "-p", tmp_path, "-c", config, "-e", "stderr", "-g", pid)


# ---- compose ----------------------------------------------------------------------------------


def test_compose_runs_three_replicas_each_on_its_own_volume() -> None:
    project = compose()
    replicas = replica_services()
    assert sorted(replicas) == [f"pullthrough-{i}" for i in range(REPLICAS)]
    caches = [mounts_by_target(s)[CACHE_PATH] for s in replicas.values()]
    assert len(set(caches)) == REPLICAS, f"replicas share a cache volume: {caches}"
    for name, replica in replicas.items():
        cache = mounts_by_target(replica)[CACHE_PATH]
        assert not is_bind(cache) and cache in (project.get("volumes") or {}), name
        assert replica["environment"]["PULLTHROUGH_CACHE__PATH"] == CACHE_PATH, name
        assert "ports" not in replica, f"{name}: clients reach replicas only through HAProxy"


def test_compose_builds_every_replica_from_the_dockerfile() -> None:
    for name, replica in replica_services().items():
        context = (FLEET / replica["build"]["context"]).resolve()
        assert context == ROOT, f"{name}: the build context is the repository root"
        assert (context / replica["build"]["dockerfile"]).resolve() == DEPLOY / "Dockerfile"
    images = {replica["image"] for replica in replica_services().values()}
    assert len(images) == 1, "one image for every replica"


def test_compose_replicas_read_the_fleet_config_and_drain_before_a_kill() -> None:
    for name, replica in replica_services().items():
        assert bind_source(replica, CONFIG_PATH) == FLEET_MIRROR, name
        assert CONFIG_PATH in read_only_binds(replica), name
        config = mirror_config(FLEET_MIRROR.read_text(encoding="utf-8"))
        assert seconds(replica["stop_grace_period"]) > config.shutdown_grace, name


def test_compose_mirror_config_is_valid_and_trusts_only_the_fleet_network() -> None:
    config = mirror_config(FLEET_MIRROR.read_text(encoding="utf-8"))
    assert config.listen_port == PORT
    assert str(config.cache.path) == CACHE_PATH
    assert config.default_upstream is not None
    network_names = {n for s in replica_services().values() for n in s["networks"]}
    assert len(network_names) == 1, "the replicas share one network"
    (network,) = network_names
    subnets = {
        ip_network(entry["subnet"]) for entry in compose()["networks"][network]["ipam"]["config"]
    }
    assert config.trusted_proxies, "HAProxy's X-Forwarded-For names the client"
    assert set(config.trusted_proxies) == subnets, "trust exactly the fleet network"


def test_compose_haproxy_runs_the_fleet_config_on_the_replicas_network() -> None:
    haproxy = compose()["services"]["haproxy"]
    assert bind_source(haproxy, f"{HAPROXY_CONFIG_DIR}/haproxy.cfg") == FLEET_HAPROXY
    assert f"{HAPROXY_CONFIG_DIR}/haproxy.cfg" in read_only_binds(haproxy)
    assert f"{PORT}:{PORT}" in [str(p) for p in haproxy["ports"]]
    assert any(str(p).endswith(":8404") for p in haproxy["ports"]), "the stats page"
    replica_networks = {n for s in replica_services().values() for n in s["networks"]}
    assert replica_networks <= set(haproxy["networks"])


def test_compose_haproxy_image_is_the_branch_the_tests_check() -> None:
    """haproxy -c here runs the Debian package; the image must be the same major.minor."""
    haproxy = require_tool("haproxy", "haproxy")
    version = re.search(r"version (\d+\.\d+)", run(haproxy, "-v").stdout)
    assert version is not None
    image = compose()["services"]["haproxy"]["image"]
    name, _, tag = image.partition(":")
    assert name == "haproxy", "the official image"
    assert tag == version[1] or tag.startswith(f"{version[1]}."), f"{image} vs {version[1]}"


def test_compose_haproxy_servers_are_the_replica_services() -> None:
    servers = haproxy_servers(FLEET_HAPROXY.read_text(encoding="utf-8"))
    replicas = sorted(replica_services(), key=lambda n: int(n.rsplit("-", 1)[1]))
    assert servers == [(f"replica-{i}", f"{name}:{PORT}") for i, name in enumerate(replicas)]


def test_compose_haproxy_config_is_valid() -> None:
    """`haproxy -c` on the file compose mounts (the replica names do not resolve here:
    those servers start down, which haproxy reports as warnings)."""
    haproxy = require_tool("haproxy", "haproxy")
    config = bind_source(compose()["services"]["haproxy"], f"{HAPROXY_CONFIG_DIR}/haproxy.cfg")
    result = run(haproxy, "-c", "-f", config)
    assert result.returncode == 0, result.stdout + result.stderr


def test_compose_bind_mount_sources_exist_and_volumes_are_declared() -> None:
    project = compose()
    named = set(project.get("volumes") or {})
    for name, svc in project["services"].items():
        for source, target in compose_mounts(svc):
            assert target.startswith("/"), f"{name}: {target} is not an absolute path"
            if is_bind(source):
                assert (FLEET / source).resolve().exists(), f"{name}: no {source}"
            else:
                assert source in named, f"{name}: volume {source} is not declared"
        for network in svc.get("networks", []):
            assert network in project["networks"], f"{name}: network {network} not declared"


def test_compose_images_are_pinned() -> None:
    for name, svc in compose()["services"].items():
        if "build" in svc:
            continue
        tag = svc["image"].rsplit("/", 1)[-1].partition(":")[2]
        assert tag and tag != "latest", f"{name}: pin {svc['image']} to a version"


# ---- Prometheus -------------------------------------------------------------------------------


def test_prometheus_scrapes_every_replica_directly() -> None:
    scrape = {job["job_name"]: job for job in load_yaml(FLEET_PROMETHEUS)["scrape_configs"]}
    job = scrape[ALERTS_JOB]
    assert job.get("metrics_path", "/metrics") == "/metrics"
    targets = {t for group in job["static_configs"] for t in group["targets"]}
    assert targets == {f"{name}:{PORT}" for name in replica_services()}


def test_prometheus_in_compose_loads_the_fleet_config_and_the_alerts() -> None:
    prometheus = compose()["services"]["prometheus"]
    assert bind_source(prometheus, "/etc/prometheus/prometheus.yml") == FLEET_PROMETHEUS
    alerts = bind_source(prometheus, "/etc/prometheus/alerts.yml")
    assert alerts == DEPLOY / "prometheus" / "alerts.yml"
    assert load_yaml(FLEET_PROMETHEUS)["rule_files"] == ["alerts.yml"]
    replica_networks = {n for s in replica_services().values() for n in s["networks"]}
    assert replica_networks <= set(prometheus["networks"]), "Prometheus reaches the replicas"


def test_promtool_check_config_as_mounted(tmp_path: Path) -> None:
    """promtool on /etc/prometheus as compose assembles it (the config and the alert rules
    it loads from its own directory)."""
    promtool = require_tool("promtool", "prometheus")
    prometheus = compose()["services"]["prometheus"]
    etc = tmp_path / "etc-prometheus"
    etc.mkdir()
    for target, source in mounts_by_target(prometheus).items():
        if is_bind(source) and str(Path(target).parent) == "/etc/prometheus":
            shutil.copy(FLEET / source, etc / Path(target).name)
    result = run(promtool, "check", "config", etc / "prometheus.yml")
    assert result.returncode == 0, result.stdout + result.stderr
    assert "SUCCESS" in result.stdout + result.stderr


# ---- Kubernetes: the kustomizations -----------------------------------------------------------


def test_every_manifest_is_a_resource_of_one_kustomization() -> None:
    manifests = {
        p
        for p in KUBERNETES.rglob("*.yaml")
        if p.name != "kustomization.yaml" and p != CONTROLLER_PATCH
    }
    listed: dict[Path, Path] = {}
    for kustomization in KUBERNETES.rglob("kustomization.yaml"):
        for resource in load_yaml(kustomization)["resources"]:
            path = (kustomization.parent / resource).resolve()
            if path.is_file():
                assert path not in listed, f"{rel(path)} is listed twice"
                listed[path] = kustomization
    assert set(listed) == manifests, "every manifest is a resource, and only manifests"
    assert "resources" not in load_yaml(CONTROLLER_PATCH), "the patch is not an object"


@pytest.mark.parametrize("overlay", [".", "haproxy", "ingress-nginx"])
def test_overlays_build_the_fleet(overlay: str) -> None:
    built = objects(overlay)
    kinds = sorted(kind for kind, _ in built)
    replicas = ["ConfigMap", "PodDisruptionBudget", "Service", "ServiceMonitor", "StatefulSet"]
    if overlay == "ingress-nginx":
        assert kinds == sorted([*replicas, "Ingress"])
    else:
        assert kinds == sorted([*replicas, "ConfigMap", "Deployment", "Service"])
    for (kind, name), doc in built.items():
        assert isinstance(doc.get("apiVersion"), str) and doc["apiVersion"], (kind, name)
        assert name, kind


def test_kustomize_sets_the_replicas_image() -> None:
    kustomization = load_yaml(KUBERNETES / "replicas" / "kustomization.yaml")
    images = {image["name"] for image in kustomization["images"]}
    assert container(statefulset())["image"].split(":")[0] in images


# ---- Kubernetes: the replicas -----------------------------------------------------------------


def test_statefulset_runs_three_replicas_behind_a_headless_service() -> None:
    spec = statefulset()["spec"]
    assert spec["replicas"] == REPLICAS
    headless = service(spec["serviceName"])
    assert headless["spec"]["clusterIP"] == "None", "per-pod DNS names need a headless Service"
    assert not headless["spec"].get("publishNotReadyAddresses", False)
    pod_labels = spec["template"]["metadata"]["labels"]
    assert labels_select(spec["selector"]["matchLabels"], pod_labels)
    assert labels_select(headless["spec"]["selector"], pod_labels)
    ports = {p["name"]: p["containerPort"] for p in container(statefulset())["ports"]}
    assert ports == {"http": PORT}
    assert [p["targetPort"] for p in headless["spec"]["ports"]] == ["http"]


def test_each_replica_has_its_own_cache_volume() -> None:
    spec = statefulset()["spec"]
    mounts = {m["mountPath"]: m for m in container(statefulset())["volumeMounts"]}
    claims = {t["metadata"]["name"] for t in spec["volumeClaimTemplates"]}
    assert mounts[CACHE_PATH]["name"] in claims, "the cache is a volumeClaimTemplate"
    env = {e["name"]: e.get("value") for e in container(statefulset())["env"]}
    assert env["PULLTHROUGH_CACHE__PATH"] == CACHE_PATH


def test_replica_config_is_valid() -> None:
    config = mirror_config(replica_config_text())
    assert config.listen_port == PORT
    assert str(config.cache.path) == CACHE_PATH
    assert config.default_upstream is not None
    pod = statefulset()["spec"]["template"]["spec"]
    (volume,) = [v for v in pod["volumes"] if "configMap" in v]
    assert volume["configMap"]["name"] == "pullthrough-config"
    args = container(statefulset())["args"]
    assert args[args.index("--config") + 1] == CONFIG_PATH


def test_replicas_drain_before_they_stop() -> None:
    """Ready only while /readyz says so; the preStop sleep (the balancers drop the pod)
    plus shutdown_grace (responses in flight) end before the kubelet's SIGKILL."""
    probe = container(statefulset())["readinessProbe"]["httpGet"]
    assert probe["path"] == "/readyz"
    assert probe["port"] == "http"
    pod = statefulset()["spec"]["template"]["spec"]
    config = mirror_config(replica_config_text())
    sleep = prestop_sleep(statefulset())
    assert sleep > 0
    assert pod["terminationGracePeriodSeconds"] > sleep + config.shutdown_grace


def test_disruption_budget_keeps_all_but_one_replica() -> None:
    budget = only("haproxy", "PodDisruptionBudget")["spec"]
    assert budget["maxUnavailable"] == 1
    assert labels_select(
        budget["selector"]["matchLabels"], statefulset()["spec"]["template"]["metadata"]["labels"]
    )


def test_servicemonitor_scrapes_every_replica_under_the_alerts_job() -> None:
    monitor = only("haproxy", "ServiceMonitor")["spec"]
    headless = service(statefulset()["spec"]["serviceName"])
    selected = [
        name
        for (kind, name), doc in objects("haproxy").items()
        if kind == "Service"
        and labels_select(monitor["selector"]["matchLabels"], doc["metadata"]["labels"])
    ]
    assert selected == [headless["metadata"]["name"]], "the pods' Service, not the balancer"
    assert headless["metadata"]["labels"][monitor["jobLabel"]] == ALERTS_JOB
    ports = {p["name"] for p in headless["spec"]["ports"]}
    for endpoint in monitor["endpoints"]:
        assert endpoint["port"] in ports
        assert endpoint.get("path", "/metrics") == "/metrics"


# ---- Kubernetes: the HAProxy balancer ---------------------------------------------------------


def test_haproxy_configmap_is_the_fleet_config_but_for_its_servers() -> None:
    """One routing key, written once: everything but the server lines is deploy/fleet/
    haproxy.cfg's, line for line (each section first, for a readable failure)."""
    shipped = FLEET_HAPROXY.read_text(encoding="utf-8")
    kubernetes = balancer_haproxy_cfg()
    for section in ("frontend registry", "backend replicas", "defaults", "resolvers dns"):
        ours = without_servers(haproxy_section(kubernetes, section))
        assert ours == without_servers(haproxy_section(shipped, section)), section
    assert without_servers(config_lines(kubernetes)) == without_servers(config_lines(shipped))
    assert len(haproxy_servers(kubernetes)) == len(haproxy_servers(shipped))


def test_haproxy_servers_are_the_statefulset_pods_by_name() -> None:
    """replica-N is pod N's stable DNS name on every balancer pod: the same ids, so the
    same ring (not server-template, whose slots fill in DNS-answer order)."""
    text = balancer_haproxy_cfg()
    assert "server-template" not in "\n".join(config_lines(text))
    spec = statefulset()["spec"]
    name, headless = statefulset()["metadata"]["name"], spec["serviceName"]
    expected = [
        (f"replica-{i}", f"{name}-{i}.{headless}.${{POD_NAMESPACE}}.svc.${{CLUSTER_DOMAIN}}:{PORT}")
        for i in range(spec["replicas"])
    ]
    assert haproxy_servers(text) == expected
    (default_server,) = [line for line in config_lines(text) if "default-server" in line]
    assert " resolvers dns" in default_server, "addresses follow the pods"


def test_haproxy_environment_defines_every_variable_the_config_uses() -> None:
    used = set(re.findall(r"\$\{(\w+)\}", "\n".join(config_lines(balancer_haproxy_cfg()))))
    env = container_env(balancer())
    assert used and used <= set(env), f"undefined: {sorted(used - set(env))}"
    assert env["POD_NAMESPACE"]["valueFrom"]["fieldRef"]["fieldPath"] == "metadata.namespace"


def test_haproxy_configmap_config_is_valid(tmp_path: Path) -> None:
    """`haproxy -c` on the ConfigMap's haproxy.cfg, with the Deployment's environment."""
    haproxy = require_tool("haproxy", "haproxy")
    env = dict(os.environ)
    for name, entry in container_env(balancer()).items():
        env[name] = entry.get("value", "pullthrough-test")  # fieldRef: a namespace
    config = tmp_path / "haproxy.cfg"
    config.write_text(balancer_haproxy_cfg())
    result = subprocess.run(
        [haproxy, "-c", "-f", str(config)],
        capture_output=True,
        text=True,
        env=env,
        timeout=60,
        check=False,
    )
    output = result.stdout + result.stderr
    assert result.returncode == 0, output
    assert "pullthrough-0.pullthrough-replicas.pullthrough-test.svc.cluster.local" in output


def test_haproxy_deployment_runs_two_balancers_behind_the_client_service() -> None:
    deployment = balancer()
    assert deployment["spec"]["replicas"] == 2
    pod_labels = deployment["spec"]["template"]["metadata"]["labels"]
    assert labels_select(deployment["spec"]["selector"]["matchLabels"], pod_labels)
    front = service("pullthrough")
    assert labels_select(front["spec"]["selector"], pod_labels)
    assert not labels_select(
        front["spec"]["selector"], statefulset()["spec"]["template"]["metadata"]["labels"]
    )
    ports = {p["name"]: p["containerPort"] for p in container(deployment)["ports"]}
    assert [(p["port"], p["targetPort"]) for p in front["spec"]["ports"]] == [(PORT, "http")]
    binds = [
        line.split()[1]
        for line in config_lines(balancer_haproxy_cfg())
        if line.strip().startswith("bind ")
    ]
    assert binds == [f":{ports['http']}", f":{ports['stats']}"]
    probe = container(deployment)["readinessProbe"]["httpGet"]
    assert probe["port"] == "stats"


def test_haproxy_image_matches_compose() -> None:
    assert container(balancer())["image"] == compose()["services"]["haproxy"]["image"]


def test_haproxy_pods_drain_before_they_stop() -> None:
    pod = balancer()["spec"]["template"]["spec"]
    assert pod["terminationGracePeriodSeconds"] > prestop_sleep(balancer()) > 0
    context = container(balancer())["securityContext"]
    assert context["readOnlyRootFilesystem"] is True
    assert pod["securityContext"]["runAsNonRoot"] is True
    assert isinstance(pod["securityContext"]["runAsUser"], int), "runAsNonRoot needs a uid"


# ---- Kubernetes: the ingress-nginx alternative ------------------------------------------------


def test_ingress_hashes_by_the_fleet_key() -> None:
    key = hash_by()
    assert HASH_BY_ALLOWED.match(key), f"ingress-nginx would refuse {key!r}"
    (variable,) = re.findall(r"\$\{?(\w+)\}?", key)
    maps = nginx_maps(http_snippet())
    defined = {block[0].split()[2].lstrip("$") for block in maps}
    assert variable in defined, f"${variable} is not defined by the http-snippet"


def test_ingress_snippet_holds_the_nginx_configs_maps() -> None:
    """The key is written once: the http-snippet's maps are deploy/fleet/nginx.conf's."""
    shipped = nginx_maps(FLEET_NGINX.read_text(encoding="utf-8"))
    assert len(shipped) == 2
    assert nginx_maps(http_snippet()) == shipped
    (upstream_hash,) = re.findall(r"^\s*hash (\S+) consistent;", FLEET_NGINX.read_text(), re.M)
    assert hash_by() == upstream_hash, "the same variable as nginx.conf's upstream"


def test_ingress_routes_to_the_replicas() -> None:
    spec = ingress()["spec"]
    (rule,) = spec["rules"]
    (path,) = rule["http"]["paths"]
    assert (path["path"], path["pathType"]) == ("/", "Prefix")
    backend = path["backend"]["service"]
    target = objects("ingress-nginx")[("Service", backend["name"])]
    assert target["metadata"]["name"] == statefulset()["spec"]["serviceName"]
    assert backend["port"]["name"] in {p["name"] for p in target["spec"]["ports"]}
    annotations = ingress()["metadata"]["annotations"]
    assert annotations["nginx.ingress.kubernetes.io/proxy-buffering"] == "off"


def test_ingress_nginx_snippet_and_hash_are_valid(tmp_path: Path) -> None:
    result = render_ingress_nginx(tmp_path, hash_by())
    assert result.returncode == 0, result.stdout + result.stderr


def test_ingress_nginx_check_catches_an_undefined_key(tmp_path: Path) -> None:
    """The render above would fail if the annotation named a variable no map defines."""
    result = render_ingress_nginx(tmp_path, "$pullthrough_undefined")
    assert result.returncode != 0
    assert "unknown" in result.stderr and "pullthrough_undefined" in result.stderr


# ---- docs -------------------------------------------------------------------------------------


def test_deploy_readme_names_every_fleet_file() -> None:
    readme = (DEPLOY / "README.md").read_text(encoding="utf-8")
    for path in sorted(FLEET.iterdir()):
        name = f"fleet/{path.name}" + ("/" if path.is_dir() else "")
        assert f"`{name}`" in readme, f"deploy/README.md does not list {name}"
