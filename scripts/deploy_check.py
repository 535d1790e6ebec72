#!/usr/bin/env python3
"""Checks of shardline's deployment material that no schema makes.

scripts/deploy-check.sh runs it in a venv that has PyYAML (it comes with
kubernetes-validate):

  deploy_check.py manifests RENDERED SECRETS   check each rendered overlay
  deploy_check.py core RENDERED                write RENDERED/<overlay>.core.yaml
                                               (core kinds, for kubernetes-validate)
  deploy_check.py dashboard DASHBOARD RULES    check the Grafana dashboard, write
                                               its queries as recording rules
                                               (for `promtool check rules`)
  deploy_check.py self-test RENDERED SECRETS   each broken reference is caught

RENDERED holds `<overlay>.yaml`, the output of `kubectl kustomize` for each
overlay; SECRETS is deploy/k8s/secrets rendered after generate.sh.

kubernetes-validate checks the core kinds against their schemas; what it
cannot see is checked here: that references resolve (ConfigMap and Secret
keys behind every mounted file the configs name, the ConfigMaps holding
the very files deploy/k8s/base ships, Service selectors and target ports,
probe ports against the configs' metrics_listen, the worker's coordinator
URL against the Service), and the custom resources the project relies on
against their documented API versions: KEDA's ScaledObject
(keda.sh/v1alpha1, prometheus trigger), the prometheus-operator's
ServiceMonitor (monitoring.coreos.com/v1), and the Prometheus adapter's
rule the HPA reads.
"""

import copy
import json
import os
import re
import sys
import tomllib
import unittest
from pathlib import Path

import yaml

REPO = Path(__file__).resolve().parent.parent
BASE = REPO / "deploy/k8s/base"
ADAPTER = REPO / "deploy/k8s/components/hpa/prometheus-adapter.yaml"
NAMESPACE = "shardline"
OVERLAYS = ("sled", "postgres", "hpa")

# Custom resources and their documented fields (KEDA 2.x ScaledObject,
# prometheus-operator ServiceMonitor): a field outside these is a typo the
# operator would reject or, worse, ignore.
CUSTOM = {("keda.sh/v1alpha1", "ScaledObject"), ("monitoring.coreos.com/v1", "ServiceMonitor")}
SCALEDOBJECT_SPEC = {
    "scaleTargetRef", "pollingInterval", "cooldownPeriod", "initialCooldownPeriod", "idleReplicaCount",
    "minReplicaCount", "maxReplicaCount", "fallback", "advanced", "triggers",
}
SCALE_TARGET = {"name", "kind", "apiVersion", "envSourceContainerName"}
TRIGGER = {"type", "name", "metadata", "metricType", "useCachedMetrics", "authenticationRef"}
PROMETHEUS_METADATA = {
    "serverAddress", "query", "threshold", "activationThreshold", "namespace", "customHeaders",
    "ignoreNullValues", "unsafeSsl", "queryParameters", "authModes",
}
ADVANCED = {"horizontalPodAutoscalerConfig", "restoreToOriginalReplicaCount", "scalingModifiers"}
SERVICEMONITOR_SPEC = {
    "selector", "namespaceSelector", "endpoints", "jobLabel", "targetLabels", "podTargetLabels",
    "sampleLimit", "targetLimit", "labelLimit", "labelNameLengthLimit", "labelValueLengthLimit",
    "attachMetadata", "scrapeProtocols", "selectorMechanism",
}
ENDPOINT = {
    "port", "targetPort", "path", "scheme", "interval", "scrapeTimeout", "params", "honorLabels",
    "honorTimestamps", "relabelings", "metricRelabelings", "tlsConfig", "bearerTokenSecret",
    "authorization", "basicAuth", "oauth2", "followRedirects", "enableHttp2", "proxyUrl",
    "filterRunning", "trackTimestampsStaleness",
}


def load(path):
    with open(path) as f:
        return [d for d in yaml.safe_load_all(f) if d]


def find(docs, kind, name=None):
    return [d for d in docs if d["kind"] == kind and (name is None or d["metadata"]["name"] == name)]


def selects(selector, labels):
    return bool(selector) and all(labels.get(k) == v for k, v in selector.items())


def workloads(docs):
    return find(docs, "StatefulSet") + find(docs, "Deployment")


def pod_labels(w):
    return w["spec"]["template"]["metadata"].get("labels", {})


def container_ports(w):
    return {p["name"]: p["containerPort"] for c in w["spec"]["template"]["spec"]["containers"]
            for p in c.get("ports", []) if "name" in p}


def port_of(addr):
    return int(addr.rsplit(":", 1)[1])


def names_token(query, name):
    return re.search(r"(?<![A-Za-z0-9_:])" + re.escape(name) + r"(?![A-Za-z0-9_:])", query) is not None


def duration(text):
    """Seconds of a humantime duration as the configs write them (`30s`, `2m`, `1m 30s`)."""
    units = {"ms": 0.001, "s": 1, "m": 60, "h": 3600}
    parts = re.findall(r"(\d+)\s*(ms|s|m|h)", text)
    if not parts or re.sub(r"(\d+)\s*(ms|s|m|h)|\s", "", text):
        raise ValueError(f"not a duration: {text!r}")
    return sum(int(n) * units[u] for n, u in parts)


def config_paths(config):
    """The files a config names: (field, path)."""
    paths = []
    for table in ("tls", "amqp_tls"):
        for key, value in (config.get(table) or {}).items():
            paths.append((f"{table}.{key}", value))
    for key, value in config.items():
        if key.endswith("_file"):
            paths.append((key, value))
    return paths


class Overlay:
    """One rendered overlay and the rendered Secrets."""

    def __init__(self, name, docs, secrets):
        self.name, self.docs, self.secrets = name, docs, secrets
        self.errors = []

    def error(self, what):
        self.errors.append(f"{self.name}: {what}")

    def secret_keys(self, name):
        for s in self.secrets + find(self.docs, "Secret"):
            if s["metadata"]["name"] == name:
                return set((s.get("data") or {}).keys()) | set((s.get("stringData") or {}).keys())
        return None

    def check(self):
        docs = self.docs
        # Kinds without a schema in kubernetes-validate other than CUSTOM
        # fail there (its warnings fail scripts/deploy-check.sh).
        for d in docs:
            if d["kind"] != "Namespace" and d["metadata"].get("namespace") != NAMESPACE:
                self.error(f"{d['kind']}/{d['metadata']['name']} is not in namespace {NAMESPACE}")
        if not find(docs, "Namespace", NAMESPACE):
            self.error(f"no Namespace {NAMESPACE}")
        coordinators = find(docs, "StatefulSet", "shardline-coordinator")
        workers = find(docs, "Deployment", "shardline-worker")
        if len(coordinators) != 1 or len(workers) != 1:
            self.error("want one StatefulSet shardline-coordinator and one Deployment shardline-worker")
            return self.errors
        configs = {}
        for w in workloads(docs):
            configs[w["metadata"]["name"]] = self.check_workload(w)
        self.check_coordinator(coordinators[0], configs.get("shardline-coordinator"))
        self.check_worker(workers[0], configs.get("shardline-worker"), configs.get("shardline-coordinator"))
        self.check_services()
        self.check_pdbs()
        self.check_network_policies()
        for so in find(docs, "ScaledObject"):
            self.check_scaledobject(so)
        for hpa in find(docs, "HorizontalPodAutoscaler"):
            self.check_hpa(hpa)
        for sm in find(docs, "ServiceMonitor"):
            self.check_servicemonitor(sm)
        if not find(docs, "ServiceMonitor"):
            self.error("no ServiceMonitor")
        if len(find(docs, "ScaledObject")) + len(find(docs, "HorizontalPodAutoscaler")) != 1:
            self.error("want exactly one autoscaler (a ScaledObject or an HPA) for the workers")
        return self.errors

    # ------------------------------------------------------------ workloads

    def check_workload(self, w):
        """The mounted config, its files, env and probes; the config, parsed."""
        name = w["metadata"]["name"]
        spec = w["spec"]["template"]["spec"]
        if not selects(w["spec"]["selector"]["matchLabels"], pod_labels(w)):
            self.error(f"{name}: its selector does not select its own pods")
        if not spec.get("securityContext", {}).get("runAsNonRoot"):
            self.error(f"{name}: pods may run as root")
        volumes = {v["name"]: v for v in spec.get("volumes", [])}
        claims = {t["metadata"]["name"] for t in w["spec"].get("volumeClaimTemplates") or []}
        (container,) = spec["containers"]
        mounts = container.get("volumeMounts", [])
        for m in mounts:
            if m["name"] not in volumes and m["name"] not in claims:
                self.error(f"{name}: mount {m['mountPath']} names no volume {m['name']}")
        env = container.get("env", [])
        envs = self.check_env(name, env)

        def provider(path):
            """(mount, volume or claim name, file within it) of `path`."""
            best = None
            for m in mounts:
                root = m["mountPath"].rstrip("/") + "/"
                if (path + "/").startswith(root) and (best is None or len(root) > len(best[0]["mountPath"])):
                    best = (m, path[len(root):] if path != root.rstrip("/") else "")
            return best

        def key_of(volume, file):
            """The Secret or ConfigMap key mounted as `file`, and its source's keys."""
            source = volume.get("secret") or volume.get("configMap")
            if "secret" in volume:
                keys = self.secret_keys(source["secretName"])
                what = f"Secret {source['secretName']}"
            else:
                cms = find(self.docs, "ConfigMap", source["name"])
                keys = set(cms[0].get("data", {})) if cms else None
                what = f"ConfigMap {source['name']}"
            if keys is None:
                return None, what, None
            items = source.get("items")
            key = next((i["key"] for i in items if i["path"] == file), None) if items else file
            return key, what, keys

        if "command" in container:
            self.error(f"{name}: `command` replaces the image's entrypoint (tini); set `args`")
        command = container.get("args", [])
        if "--config" not in command:
            self.error(f"{name}: no --config in its command")
            return None
        config_path = command[command.index("--config") + 1]
        found = provider(config_path)
        if not found or "configMap" not in volumes.get(found[0]["name"], {}):
            self.error(f"{name}: --config {config_path} is not in a mounted ConfigMap")
            return None
        mount, file = found
        key, what, keys = key_of(volumes[mount["name"]], file)
        if keys is None or key not in keys:
            self.error(f"{name}: --config {config_path}: {what} has no key {key}")
            return None
        text = find(self.docs, "ConfigMap", volumes[mount["name"]]["configMap"]["name"])[0]["data"][key]
        source = BASE / key
        if not source.is_file() or source.read_text() != text:
            self.error(f"{name}: the ConfigMap's {key} is not deploy/k8s/base/{key} (what tests/tests/deploy.rs validates)")
        config = tomllib.loads(text)

        for field, path in config_paths(config):
            found = provider(path)
            if not found:
                self.error(f"{name}: {field} = {path} is not mounted")
                continue
            mount, file = found
            volume = volumes.get(mount["name"])
            if volume is None or not ("secret" in volume or "configMap" in volume):
                self.error(f"{name}: {field} = {path} is not in a mounted Secret or ConfigMap")
                continue
            key, what, keys = key_of(volume, file)
            if keys is None:
                self.error(f"{name}: {field} = {path}: {what} does not exist")
            elif key is None or key not in keys:
                self.error(f"{name}: {field} = {path}: {what} has no key for {file}")
        sled = "SHARDLINE_STORE" not in envs and config.get("store", "sled") == "sled"
        if sled and "data_dir" in config:
            found = provider(config["data_dir"])
            if not found or (found[0]["name"] not in claims and "persistentVolumeClaim" not in volumes.get(found[0]["name"], {})):
                self.error(f"{name}: data_dir {config['data_dir']} (the sled store) is not on a persistent volume")

        ports = container_ports(w)
        for probe, path in (("readinessProbe", "/readyz"), ("livenessProbe", "/healthz"), ("startupProbe", "/healthz")):
            get = container.get(probe, {}).get("httpGet")
            if not get:
                self.error(f"{name}: no {probe}")
                continue
            if get.get("path") != path:
                self.error(f"{name}: {probe} asks {get.get('path')}, not {path}")
            port = ports.get(get["port"], get["port"])
            if "metrics_listen" not in config or port != port_of(config["metrics_listen"]):
                self.error(f"{name}: {probe} port {get['port']} is not metrics_listen ({config.get('metrics_listen')})")
        return {"config": config, "env": envs, "ports": ports}

    def check_env(self, name, env):
        """Each variable's source exists and `$(VAR)` names an earlier one."""
        seen = {}
        for e in env:
            ref = (e.get("valueFrom") or {}).get("secretKeyRef")
            if ref:
                keys = self.secret_keys(ref["name"])
                if keys is None and not ref.get("optional"):
                    self.error(f"{name}: env {e['name']}: no Secret {ref['name']}")
                elif keys is not None and ref["key"] not in keys:
                    self.error(f"{name}: env {e['name']}: Secret {ref['name']} has no key {ref['key']}")
            for var in re.findall(r"\$\(([A-Za-z_][A-Za-z0-9_]*)\)", e.get("value", "")):
                if var not in seen:
                    self.error(f"{name}: env {e['name']} refers to $({var}), not defined before it")
            seen[e["name"]] = e
        return seen

    def check_coordinator(self, sts, c):
        if c is None:
            return
        spec, config = sts["spec"], c["config"]
        if "grpc" not in c["ports"] or c["ports"]["grpc"] != port_of(config["listen"]):
            self.error(f"coordinator: container port grpc is not listen ({config['listen']})")
        if spec.get("podManagementPolicy") != "Parallel":
            self.error("coordinator: podManagementPolicy must be Parallel (standbys are never ready)")
        if "SHARDLINE_STORE" in c["env"]:
            if spec.get("replicas", 1) < 2:
                self.error("coordinator: PostgreSQL store with fewer than 2 replicas")
            if spec.get("volumeClaimTemplates"):
                self.error("coordinator: PostgreSQL store, yet a volume per replica")
            advertise = c["env"].get("SHARDLINE_ADVERTISE_URL", {}).get("value", "")
            pod = c["env"].get("POD_NAME", {}).get("valueFrom", {}).get("fieldRef", {}).get("fieldPath")
            scheme = "https" if "tls" in config else "http"
            want = f"{scheme}://$(POD_NAME).{spec['serviceName']}:{c['ports'].get('grpc')}"
            if advertise != want or pod != "metadata.name":
                self.error(f"coordinator: SHARDLINE_ADVERTISE_URL is {advertise!r} (POD_NAME from {pod}); want {want!r} with POD_NAME from metadata.name")
        elif spec.get("replicas") != 1:
            self.error("coordinator: sled store with other than 1 replica")
        peers = find(self.docs, "Service", spec["serviceName"])
        if not peers or peers[0]["spec"].get("clusterIP") != "None" or not peers[0]["spec"].get("publishNotReadyAddresses"):
            self.error(f"coordinator: serviceName {spec['serviceName']} is no headless Service publishing not-ready pods")

    def check_worker(self, deploy, w, c):
        if w is None or c is None:
            return
        config = w["config"]
        drain = config.get("drain_timeout", "30s")
        seconds = duration(drain)
        grace = deploy["spec"]["template"]["spec"].get("terminationGracePeriodSeconds", 30)
        if grace < seconds + 10:
            self.error(f"worker: terminationGracePeriodSeconds {grace} leaves under 10 s past drain_timeout {drain}")
        url = re.fullmatch(r"(https?)://([^:/]+):(\d+)", config["coordinator"])
        if not url:
            self.error(f"worker: coordinator {config['coordinator']} is not one URL")
            return
        scheme, host, port = url.group(1), url.group(2), int(url.group(3))
        if (scheme == "https") != ("tls" in c["config"]):
            self.error(f"worker: coordinator URL is {scheme}:// but the coordinator {'serves' if 'tls' in c['config'] else 'has no'} TLS")
        service = find(self.docs, "Service", host.split(".")[0])
        if not service:
            self.error(f"worker: coordinator host {host} is no Service")
            return
        (service,) = service
        sts = find(self.docs, "StatefulSet", "shardline-coordinator")[0]
        if not selects(service["spec"].get("selector"), pod_labels(sts)):
            self.error(f"worker: Service {host} does not select the coordinators")
        if service["spec"].get("publishNotReadyAddresses") or service["spec"].get("clusterIP") == "None":
            self.error(f"worker: Service {host} would reach standbys too (not ready, or headless)")
        target = next((p.get("targetPort") for p in service["spec"]["ports"] if p["port"] == port), None)
        if target not in ("grpc", c["ports"].get("grpc")):
            self.error(f"worker: Service {host} port {port} does not lead to the coordinators' grpc port")

    # ------------------------------------------------------------ services

    def check_services(self):
        for s in find(self.docs, "Service"):
            name = s["metadata"]["name"]
            pods = [w for w in workloads(self.docs) if selects(s["spec"].get("selector"), pod_labels(w))]
            if not pods:
                self.error(f"Service {name} selects no workload's pods")
                continue
            for p in s["spec"]["ports"]:
                target = p.get("targetPort", p["port"])
                for w in pods:
                    ports = container_ports(w)
                    if target not in ports and target not in ports.values():
                        self.error(f"Service {name} port {p.get('name')} targets {target}, which {w['metadata']['name']} lacks")

    def check_pdbs(self):
        pdbs = find(self.docs, "PodDisruptionBudget")
        worker = find(self.docs, "Deployment", "shardline-worker")[0]
        if not any(selects(p["spec"]["selector"]["matchLabels"], pod_labels(worker)) for p in pdbs):
            self.error("no PodDisruptionBudget selects the workers")
        for p in pdbs:
            if not any(selects(p["spec"]["selector"]["matchLabels"], pod_labels(w)) for w in workloads(self.docs)):
                self.error(f"PodDisruptionBudget {p['metadata']['name']} selects no pods")

    def check_network_policies(self):
        policies = find(self.docs, "NetworkPolicy")
        for w in workloads(self.docs):
            name, ports = w["metadata"]["name"], container_ports(w)
            mine = [p for p in policies if selects(p["spec"]["podSelector"].get("matchLabels"), pod_labels(w))]
            if not mine:
                self.error(f"no NetworkPolicy selects {name}")
            allowed = {}
            for p in mine:
                for rule in p["spec"].get("ingress", []):
                    for port in rule.get("ports", []):
                        if port["port"] not in ports and port["port"] not in ports.values():
                            self.error(f"NetworkPolicy {p['metadata']['name']}: {name} has no port {port['port']}")
                        allowed.setdefault(port["port"], []).extend(rule.get("from", []))
            if not any(f.get("namespaceSelector") for f in allowed.get("metrics", [])):
                self.error(f"NetworkPolicy: Prometheus (another namespace) may not reach {name}'s metrics port")
            if "grpc" in ports:
                worker = find(self.docs, "Deployment", "shardline-worker")[0]
                sources = [f.get("podSelector", {}).get("matchLabels") for f in allowed.get("grpc", []) if "namespaceSelector" not in f]
                if not any(selects(s, pod_labels(worker)) for s in sources):
                    self.error(f"NetworkPolicy: workers may not reach {name}'s grpc port")

    # ------------------------------------------------------------ autoscaling and monitoring

    def autoscaled_deployment(self, ref, what):
        kind = ref.get("kind", "Deployment")
        target = find(self.docs, kind, ref.get("name"))
        if kind != "Deployment" or not target:
            self.error(f"{what}: scaleTargetRef {kind}/{ref.get('name')} is not a Deployment here")
            return
        if ref.get("apiVersion", "apps/v1") != "apps/v1":
            self.error(f"{what}: scaleTargetRef apiVersion {ref.get('apiVersion')}")
        if "replicas" in target[0]["spec"]:
            self.error(f"{what}: the Deployment still sets replicas (each apply would undo the autoscaler)")

    def check_scaledobject(self, so):
        what = f"ScaledObject {so['metadata']['name']}"
        spec = so["spec"]
        for key in set(spec) - SCALEDOBJECT_SPEC:
            self.error(f"{what}: spec.{key} is not a ScaledObject field")
        for key in set(spec.get("advanced", {})) - ADVANCED:
            self.error(f"{what}: spec.advanced.{key} is not a ScaledObject field")
        ref = spec.get("scaleTargetRef", {})
        for key in set(ref) - SCALE_TARGET:
            self.error(f"{what}: scaleTargetRef.{key} is not a field")
        self.autoscaled_deployment(ref, what)
        if not spec.get("minReplicaCount", 0) <= spec.get("maxReplicaCount", 100):
            self.error(f"{what}: minReplicaCount above maxReplicaCount")
        if not spec.get("triggers"):
            self.error(f"{what}: no triggers")
        for t in spec.get("triggers", []):
            for key in set(t) - TRIGGER:
                self.error(f"{what}: triggers[].{key} is not a field")
            if t.get("type") != "prometheus":
                self.error(f"{what}: trigger type {t.get('type')}, not prometheus")
                continue
            meta = t.get("metadata", {})
            for key in set(meta) - PROMETHEUS_METADATA:
                self.error(f"{what}: prometheus trigger metadata.{key} is not a field")
            for key, value in meta.items():
                if not isinstance(value, str):
                    self.error(f"{what}: metadata.{key} is {value!r}; trigger metadata values are strings")
            if not re.match(r"https?://[^/\s]+", meta.get("serverAddress", "")):
                self.error(f"{what}: serverAddress {meta.get('serverAddress')!r} is no URL")
            query = meta.get("query", "")
            if not names_token(query, "shardline_desired_workers"):
                self.error(f"{what}: the query does not read shardline_desired_workers")
            try:
                if float(meta.get("threshold", "")) <= 0:
                    raise ValueError
            except ValueError:
                self.error(f"{what}: threshold {meta.get('threshold')!r} is not a positive number")

    def check_hpa(self, hpa):
        what = f"HorizontalPodAutoscaler {hpa['metadata']['name']}"
        if hpa["apiVersion"] != "autoscaling/v2":
            self.error(f"{what}: {hpa['apiVersion']}, not autoscaling/v2")
        self.autoscaled_deployment(hpa["spec"]["scaleTargetRef"], what)
        rules = yaml.safe_load(ADAPTER.read_text())["rules"]["external"]
        served = {r["name"]["as"]: r for r in rules}
        for m in hpa["spec"].get("metrics", []):
            if m["type"] != "External":
                self.error(f"{what}: a {m['type']} metric; the adapter serves External ones")
                continue
            name = m["external"]["metric"]["name"]
            rule = served.get(name)
            if rule is None:
                self.error(f"{what}: external metric {name} is not one prometheus-adapter.yaml serves ({sorted(served)})")
                continue
            if not names_token(rule["seriesQuery"], "shardline_desired_workers"):
                self.error(f"{what}: the adapter's rule for {name} does not read shardline_desired_workers")
            for part in ("<<.Series>>", "<<.LabelMatchers>>", "<<.GroupBy>>"):
                if part not in rule["metricsQuery"]:
                    self.error(f"{what}: the adapter's metricsQuery lacks {part}")
            if rule.get("resources", {}).get("overrides", {}).get("namespace", {}).get("resource") != "namespace":
                self.error(f"{what}: the adapter's rule does not map the namespace label (the HPA asks per namespace)")
            if m["external"]["target"]["type"] != "AverageValue":
                self.error(f"{what}: target type {m['external']['target']['type']}; AverageValue makes replicas = the figure")

    def check_servicemonitor(self, sm):
        what = f"ServiceMonitor {sm['metadata']['name']}"
        spec = sm["spec"]
        for key in set(spec) - SERVICEMONITOR_SPEC:
            self.error(f"{what}: spec.{key} is not a ServiceMonitor field")
        if "namespaceSelector" in spec:
            self.error(f"{what}: namespaceSelector set; the Services are in its own namespace")
        selected = [s for s in find(self.docs, "Service") if selects(spec["selector"].get("matchLabels"), s["metadata"].get("labels", {}))]
        if not selected:
            self.error(f"{what}: its selector matches no Service's labels")
        for e in spec.get("endpoints", []):
            for key in set(e) - ENDPOINT:
                self.error(f"{what}: endpoints[].{key} is not a field")
            if e.get("path", "/metrics") != "/metrics":
                self.error(f"{what}: path {e.get('path')}, not /metrics")
            for s in selected:
                if e.get("port") not in {p.get("name") for p in s["spec"]["ports"]}:
                    self.error(f"{what}: Service {s['metadata']['name']} has no port named {e.get('port')}")
        # Every workload scraped, once: standbys too (not-ready pods).
        for w in workloads(self.docs):
            by = [s for s in selected if selects(s["spec"].get("selector"), pod_labels(w))]
            if len(by) != 1:
                self.error(f"{what}: {w['metadata']['name']} is scraped through {len(by)} Services, not 1")
            elif not by[0]["spec"].get("publishNotReadyAddresses") and w["kind"] == "StatefulSet":
                self.error(f"{what}: Service {by[0]['metadata']['name']} hides not-ready coordinators (standbys) from Prometheus")


def rendered(directory):
    return {o: load(Path(directory) / f"{o}.yaml") for o in OVERLAYS}


def check_manifests(directory, secrets_file):
    secrets = load(secrets_file)
    errors = []
    for name, docs in rendered(directory).items():
        errors += Overlay(name, docs, secrets).check()
    return errors


def write_core(directory):
    """Each overlay's core kinds alone, for kubernetes-validate (it has no
    schema for the custom resources: this script checks those)."""
    for name, docs in rendered(directory).items():
        core = [d for d in docs if (d["apiVersion"], d["kind"]) not in CUSTOM]
        with open(Path(directory) / f"{name}.core.yaml", "w") as f:
            yaml.safe_dump_all(core, f)


def check_dashboard(path, rules_out):
    """Panels well formed; their queries (Grafana's variables given
    values) written as recording rules for `promtool check rules`."""
    errors, rules, ids = [], [], set()
    dash = json.loads(Path(path).read_text())
    if dash.get("uid") != "shardline":
        errors.append("dashboard uid is not `shardline`")
    variables = {v["name"] for v in dash.get("templating", {}).get("list", [])}
    for p in dash["panels"]:
        if p["id"] in ids:
            errors.append(f"panel id {p['id']} twice")
        ids.add(p["id"])
        g = p["gridPos"]
        if g["x"] + g["w"] > 24:
            errors.append(f"panel {p['title']!r} is wider than the grid")
        if p["type"] == "row":
            continue
        if p.get("datasource", {}).get("uid") != "${datasource}":
            errors.append(f"panel {p['title']!r} does not use the $datasource variable")
        if not p.get("targets"):
            errors.append(f"panel {p['title']!r} has no query")
        for t in p.get("targets", []):
            expr = t.get("expr", "")
            for var in re.findall(r"\$\{?([A-Za-z_]\w*)", expr):
                if var not in variables and not var.startswith("__"):
                    errors.append(f"panel {p['title']!r} uses ${var}, no such variable")
            expr = expr.replace("$__rate_interval", "1m").replace("$namespace", ".*")
            rules.append({"record": f"dashboard:panel_{p['id']}_{t['refId']}", "expr": expr})
    with open(rules_out, "w") as f:
        yaml.safe_dump({"groups": [{"name": "dashboard", "rules": rules}]}, f)
    return errors


class Mutations(unittest.TestCase):
    """Each reference broken on purpose is reported (the checks can fail)."""

    directory = secrets = None
    cache = {}

    def broken(self, overlay, mutate, expect):
        if not self.cache:
            self.cache.update(rendered(self.directory), secrets=load(self.secrets))
        docs, secrets = copy.deepcopy(self.cache[overlay]), copy.deepcopy(self.cache["secrets"])
        self.assertEqual(Overlay(overlay, copy.deepcopy(docs), secrets).check(), [], "the unbroken render fails")
        mutate(docs, secrets)
        errors = Overlay(overlay, docs, secrets).check()
        self.assertTrue(any(expect in e for e in errors), f"no error mentions {expect!r}: {errors}")

    def test_scaledobject_target_renamed(self):
        def m(docs, _):
            find(docs, "ScaledObject")[0]["spec"]["scaleTargetRef"]["name"] = "shardline-workers"
        self.broken("sled", m, "scaleTargetRef Deployment/shardline-workers")

    def test_worker_deployment_renamed(self):
        def m(docs, _):
            find(docs, "Deployment")[0]["metadata"]["name"] = "workers"
        self.broken("postgres", m, "one Deployment shardline-worker")

    def test_keda_query_on_another_metric(self):
        def m(docs, _):
            t = find(docs, "ScaledObject")[0]["spec"]["triggers"][0]
            t["metadata"]["query"] = "max(shardline_desired_workers_total)"
        self.broken("sled", m, "does not read shardline_desired_workers")

    def test_keda_metadata_not_a_string(self):
        def m(docs, _):
            find(docs, "ScaledObject")[0]["spec"]["triggers"][0]["metadata"]["ignoreNullValues"] = False
        self.broken("sled", m, "values are strings")

    def test_scaledobject_field_misspelt(self):
        def m(docs, _):
            spec = find(docs, "ScaledObject")[0]["spec"]
            spec["maxReplicas"] = spec.pop("maxReplicaCount")
        self.broken("postgres", m, "spec.maxReplicas is not a ScaledObject field")

    def test_servicemonitor_port_name(self):
        def m(docs, _):
            find(docs, "ServiceMonitor")[0]["spec"]["endpoints"][0]["port"] = "http-metrics"
        self.broken("hpa", m, "no port named http-metrics")

    def test_servicemonitor_misses_the_workers(self):
        def m(docs, _):
            del find(docs, "Service", "shardline-worker-metrics")[0]["metadata"]["labels"]["shardline.io/scrape"]
        self.broken("sled", m, "shardline-worker is scraped through 0 Services")

    def test_hpa_metric_the_adapter_does_not_serve(self):
        def m(docs, _):
            find(docs, "HorizontalPodAutoscaler")[0]["spec"]["metrics"][0]["external"]["metric"]["name"] = "desired_workers"
        self.broken("hpa", m, "not one prometheus-adapter.yaml serves")

    def test_probe_path(self):
        def m(docs, _):
            c = find(docs, "StatefulSet")[0]["spec"]["template"]["spec"]["containers"][0]
            c["readinessProbe"]["httpGet"]["path"] = "/healthz"
        self.broken("postgres", m, "readinessProbe asks /healthz, not /readyz")

    def test_probe_port_not_metrics_listen(self):
        def m(docs, _):
            c = find(docs, "Deployment")[0]["spec"]["template"]["spec"]["containers"][0]
            c["ports"][0]["containerPort"] = 9501
        self.broken("sled", m, "is not metrics_listen")

    def test_secret_key_missing(self):
        def m(_, secrets):
            tls = next(s for s in secrets if s["metadata"]["name"] == "shardline-tls")
            del tls["data"]["ca.crt"]
        self.broken("sled", m, "tls.ca = /etc/shardline/tls/ca.crt: Secret shardline-tls has no key")

    def test_token_not_mounted(self):
        def m(docs, _):
            spec = find(docs, "StatefulSet")[0]["spec"]["template"]["spec"]
            tokens = next(v for v in spec["volumes"] if v["name"] == "tokens")
            tokens["secret"]["items"] = [i for i in tokens["secret"]["items"] if i["key"] != "viewer-token"]
        self.broken("sled", m, "viewer_token_file")

    def test_configmap_is_not_the_shipped_file(self):
        def m(docs, _):
            cm = next(c for c in find(docs, "ConfigMap") if "worker.toml" in c["data"])
            cm["data"]["worker.toml"] += "\ncapacity = 3\n"
        self.broken("sled", m, "is not deploy/k8s/base/worker.toml")

    def test_postgres_url_secret_missing(self):
        def m(_, secrets):
            secrets[:] = [s for s in secrets if s["metadata"]["name"] != "shardline-postgres"]
        self.broken("postgres", m, "no Secret shardline-postgres")

    def test_advertised_address_not_the_peers_service(self):
        def m(docs, _):
            env = find(docs, "StatefulSet")[0]["spec"]["template"]["spec"]["containers"][0]["env"]
            next(e for e in env if e["name"] == "SHARDLINE_ADVERTISE_URL")["value"] = "https://$(POD_NAME):7400"
        self.broken("postgres", m, "SHARDLINE_ADVERTISE_URL")

    def test_sled_store_without_its_volume(self):
        def m(docs, _):
            del find(docs, "StatefulSet")[0]["spec"]["volumeClaimTemplates"]
        self.broken("sled", m, "names no volume data")

    def test_coordinator_service_reaching_standbys(self):
        def m(docs, _):
            find(docs, "Service", "shardline-coordinator")[0]["spec"]["publishNotReadyAddresses"] = True
        self.broken("postgres", m, "would reach standbys too")

    def test_grace_period_shorter_than_the_drain(self):
        def m(docs, _):
            find(docs, "Deployment")[0]["spec"]["template"]["spec"]["terminationGracePeriodSeconds"] = 30
        self.broken("sled", m, "terminationGracePeriodSeconds 30")

    def test_network_policy_port(self):
        def m(docs, _):
            p = find(docs, "NetworkPolicy", "shardline-coordinator")[0]
            p["spec"]["ingress"][0]["ports"][0]["port"] = "gprc"
        self.broken("sled", m, "has no port gprc")

    def test_service_target_port(self):
        def m(docs, _):
            find(docs, "Service", "shardline-coordinator")[0]["spec"]["ports"][0]["targetPort"] = "rpc"
        self.broken("hpa", m, "targets rpc")


def main(argv):
    if len(argv) == 4 and argv[1] == "manifests":
        errors = check_manifests(argv[2], argv[3])
    elif len(argv) == 3 and argv[1] == "core":
        write_core(argv[2])
        errors = []
    elif len(argv) == 4 and argv[1] == "dashboard":
        errors = check_dashboard(argv[2], argv[3])
    elif len(argv) == 4 and argv[1] == "self-test":
        Mutations.directory, Mutations.secrets = argv[2], argv[3]
        result = unittest.main(argv=[argv[0], "-q"], module=__name__, defaultTest="Mutations", exit=False).result
        return 0 if result.wasSuccessful() else 1
    else:
        print(__doc__, file=sys.stderr)
        return 2
    for e in errors:
        print(f"error: {e}", file=sys.stderr)
    return 1 if errors else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
