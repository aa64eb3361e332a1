"""Offline checks of deploy/: no cluster, no network, no Docker.

For the Helm chart and every values file in deploy/helm/pdserve/ci/: it renders and
lints (the Helm v4 SDK bundled in helm-python), its built-in kinds pass the Kubernetes
schemas in strict mode, it matches its golden file (PDSERVE_UPDATE_GOLDEN=1 rewrites
them), and every container command that runs `pdserve` parses with pdserve's own CLI
parser, so the chart cannot drift from the CLI. The Grafana dashboard may only query
series pdserve exports; the `ray up` config must match Ray's schema.
"""
from __future__ import annotations

import base64
import contextlib
import functools
import io
import json
import os
import re
import shlex
from pathlib import Path
from typing import Any, Iterator

import pytest
import yaml

from pdserve.cli import build_parser

helm = pytest.importorskip("helm_python")
kubernetes_validate = pytest.importorskip("kubernetes_validate")

ROOT = Path(__file__).resolve().parents[2]
CHART = ROOT / "deploy" / "helm" / "pdserve"
CI_FILES = sorted((CHART / "ci").glob("*.yaml"))
GOLDEN = Path(__file__).parent / "golden"
DASHBOARD = ROOT / "deploy" / "grafana" / "pdserve.json"
RAY_CLUSTER = ROOT / "deploy" / "ray" / "cluster.yaml"
DOCKERFILE = ROOT / "deploy" / "docker" / "Dockerfile"

KUBE_VERSION = "1.33.0"          # schemas and lint; the chart needs >= 1.27 (gRPC probes)
RELEASE, NAMESPACE = "pdserve", "serving"
# Custom resources: no schema in kubernetes-validate; their essentials are asserted below.
CRDS = {("ray.io/v1", "RayCluster"), ("monitoring.coreos.com/v1", "ServiceMonitor")}
STARTUP_BUDGET_S = 600            # model loading on every worker

assert CI_FILES, f"no values files in {CHART / 'ci'}"
ids = [f.stem for f in CI_FILES]
ci_files = pytest.mark.parametrize("ci_file", CI_FILES, ids=ids)


# ---- rendering ---------------------------------------------------------------------

def load_values(path: Path | None) -> dict[str, Any] | None:
    return None if path is None else helm.values_from_yaml(path.read_text())


@functools.cache
def render(path: Path | None) -> dict[str, str]:
    """Template path -> rendered text, as `helm template` (an install) would produce."""
    with helm.Chart.load(CHART) as chart:
        return chart.render(load_values(path), name=RELEASE, namespace=NAMESPACE, is_install=True)


@functools.cache
def merged_values(path: Path | None) -> dict[str, Any]:
    with helm.Chart.load(CHART) as chart:
        return chart.merge_values(load_values(path))


@functools.cache
def _parsed(path: Path | None) -> str:
    docs = []
    for source, text in sorted(render(path).items()):
        if source.endswith("NOTES.txt"):
            continue
        docs += [d for d in yaml.safe_load_all(text) if d]
    return json.dumps(docs)


def manifests(path: Path | None) -> list[dict[str, Any]]:
    """The rendered objects (a fresh copy each call: tests may not share mutable state)."""
    return json.loads(_parsed(path))


def golden_text(path: Path) -> str:
    parts = [f"---\n# Source: {source}\n{text.strip()}\n"
             for source, text in sorted(render(path).items())
             if not source.endswith("NOTES.txt") and text.strip()]
    return "".join(parts)


def one(docs: list[dict[str, Any]], kind: str) -> dict[str, Any]:
    found = [d for d in docs if d["kind"] == kind]
    assert len(found) == 1, f"expected one {kind}, got {len(found)}"
    return found[0]


def router_container(docs: list[dict[str, Any]]) -> dict[str, Any]:
    pod = one(docs, "Deployment")["spec"]["template"]["spec"]
    return next(c for c in pod["containers"] if c["name"] == "router")


def containers(obj: Any) -> Iterator[dict[str, Any]]:
    """Every container and initContainer anywhere in a manifest (Deployments, RayCluster
    head and worker group templates alike)."""
    if isinstance(obj, dict):
        for key, value in obj.items():
            if key in ("containers", "initContainers") and isinstance(value, list):
                yield from value
            else:
                yield from containers(value)
    elif isinstance(obj, list):
        for item in obj:
            yield from containers(item)


# ---- pdserve command lines -----------------------------------------------------------

_SHELLS = {"sh", "bash", "/bin/sh", "/bin/bash", "/usr/bin/env"}


def pdserve_invocations(argv: list[str]) -> list[list[str]]:
    """The argument lists of every `pdserve ...` an argv runs: directly, or inside a
    `sh -c` / `bash -lc` script (split at &&, ||, ; and |)."""
    if len(argv) >= 3 and argv[0] in _SHELLS and argv[1].startswith("-") and "c" in argv[1]:
        lexer = shlex.shlex(argv[2], posix=True, punctuation_chars=True)
        lexer.whitespace_split = True
        words, found, current = list(lexer), [], []
        for w in words + [";"]:
            if w in ("&&", "||", ";", "|", "&"):
                found += pdserve_invocations(current)
                current = []
            else:
                current.append(w)
        return found
    for i, word in enumerate(argv):
        if word == "pdserve" or word.endswith("/pdserve"):
            return [argv[i + 1:]]
    return []


def parse_cli(args: list[str]):
    """pdserve's own parser on `args`; unknown flags or bad choices fail the test."""
    err = io.StringIO()
    try:
        with contextlib.redirect_stderr(err):
            return build_parser().parse_args(args)
    except SystemExit as e:
        raise AssertionError(f"`pdserve {shlex.join(args)}` does not parse with pdserve.cli: "
                             f"{err.getvalue().strip()}") from e


def chart_invocations(path: Path | None) -> list[tuple[str, list[str]]]:
    found = []
    for doc in manifests(path):
        for c in containers(doc):
            argv = [str(a) for a in (c.get("command") or []) + (c.get("args") or [])]
            found += [(c["name"], inv) for inv in pdserve_invocations(argv)]
    return found


def test_cli_check_catches_drift() -> None:
    """The checker itself: an unknown flag, a bad choice and a shell-wrapped call."""
    with pytest.raises(AssertionError, match="does not parse"):
        parse_cli(["serve", "--no-such-flag", "1"])
    with pytest.raises(AssertionError, match="does not parse"):
        parse_cli(["serve", "--transport", "carrier-pigeon"])
    assert pdserve_invocations(["/bin/bash", "-lc", "ulimit -n 65536; pdserve serve --prefill 2 && echo ok"]) \
        == [["serve", "--prefill", "2"]]
    assert pdserve_invocations(["python", "-c", "print(1)"]) == []


# ---- chart: render, lint, schemas, golden ------------------------------------------

@pytest.mark.parametrize("ci_file", [None, *CI_FILES], ids=["chart-defaults", *ids])
def test_lint_strict(ci_file: Path | None) -> None:
    report = helm.lint(CHART, load_values(ci_file), strict=True, namespace=NAMESPACE,
                       kube_version=f"v{KUBE_VERSION}")
    assert report["errors"] == []
    problems = [m for m in report["messages"] if m["severity"] >= 2]   # 2 warning, 3 error
    assert problems == []


@ci_files
def test_builtin_kinds_match_kubernetes_schema(ci_file: Path) -> None:
    docs = manifests(ci_file)
    kinds = {(d["apiVersion"], d["kind"]) for d in docs}
    assert {("apps/v1", "Deployment"), ("v1", "Service"), ("ray.io/v1", "RayCluster")} <= kinds
    for doc in docs:
        if (doc["apiVersion"], doc["kind"]) in CRDS:
            continue
        try:
            kubernetes_validate.validate(doc, KUBE_VERSION, strict=True)
        except kubernetes_validate.ValidationError as e:
            pytest.fail(f"{doc['kind']}/{doc['metadata']['name']}: {e.message} at {list(e.path)}")


@ci_files
def test_golden(ci_file: Path) -> None:
    golden = GOLDEN / ci_file.name
    text = golden_text(ci_file)
    if os.environ.get("PDSERVE_UPDATE_GOLDEN") == "1":
        golden.parent.mkdir(parents=True, exist_ok=True)
        golden.write_text(text)
    assert golden.is_file(), f"{golden} is missing: run with PDSERVE_UPDATE_GOLDEN=1"
    assert text == golden.read_text(), (
        f"rendered chart differs from {golden.relative_to(ROOT)}; if intended, "
        "rerun with PDSERVE_UPDATE_GOLDEN=1 and review the diff")


def test_every_ci_file_has_a_golden_file() -> None:
    stale = {p.name for p in GOLDEN.glob("*.yaml")} - {p.name for p in CI_FILES}
    assert not stale, f"golden files without a values file: {sorted(stale)}"


def test_schema_rejects_bad_values() -> None:
    bad = [
        {"prefill": {"gpuz": 1}},                              # typo: unknown key
        {"model": {"source": "pvc"}},                          # pvc without claimName
        {"model": {"source": "s3"}},
        {"serve": {"transport": "nccl"}},                      # cannot cross worker groups
        {"prefill": {"rayStartParams": {"resources": "{}"}}},  # set via rayResource
        {"apiKey": {"value": "k", "existingSecret": "s"}},
        {"prefill": {"gpus": 2}},                              # decode has 0 GPUs per worker
    ]
    with helm.Chart.load(CHART) as chart:
        for values in bad:
            with pytest.raises(helm.HelmError):
                chart.render(values, name=RELEASE, namespace=NAMESPACE)


# ---- chart: essentials ----------------------------------------------------------------

@pytest.mark.parametrize("ci_file", [None, *CI_FILES], ids=["chart-defaults", *ids])
def test_pdserve_commands_parse_with_the_cli(ci_file: Path | None) -> None:
    invocations = chart_invocations(ci_file)
    serves = [(name, parse_cli(args)) for name, args in invocations if args[:1] == ["serve"]]
    for _, args in invocations:
        parse_cli(args)
    assert [name for name, _ in serves] == ["router"], "exactly one `pdserve serve`, in the router"
    args = serves[0][1]
    v = merged_values(ci_file)
    docs = manifests(ci_file)
    cluster = one(docs, "RayCluster")
    assert args.ray_address == f"ray://{cluster['metadata']['name']}-head-svc:{v['ray']['clientPort']}"
    assert args.host == "0.0.0.0"
    assert (args.grpc_port, args.http_port) == (v["router"]["grpcPort"], v["router"]["httpPort"])
    assert args.prefill == v["prefill"]["replicas"] * v["prefill"]["workersPerPod"]
    assert args.decode == v["decode"]["replicas"] * v["decode"]["workersPerPod"]
    assert args.transport == "grpc"
    assert args.api_key is None, "the API key travels in env PDSERVE_API_KEY, never in argv"
    groups = {g["groupName"]: g for g in cluster["spec"]["workerGroupSpecs"]}
    assert args.prefill_ray_resource in ray_resources(groups["prefill"])
    assert args.decode_ray_resource in ray_resources(groups["decode"])
    # The model directory is mounted at the same path on the router and on every worker.
    if v["model"]["source"] != "image":
        for c in [router_container(docs), *(worker_container(g) for g in groups.values())]:
            mounts = [m["mountPath"] for m in c.get("volumeMounts", [])]
            assert any(args.model == m or args.model.startswith(m.rstrip("/") + "/") for m in mounts), \
                f"{c['name']}: --model {args.model} is not under any of {mounts}"


def ray_resources(group: dict[str, Any]) -> dict[str, int]:
    """rayStartParams.resources is '"{\\"name\\": n}"': JSON in quotes for KubeRay's shell."""
    raw = group["rayStartParams"]["resources"]
    assert raw.startswith('"') and raw.endswith('"'), raw
    return json.loads(raw[1:-1].replace('\\"', '"'))


def worker_container(group: dict[str, Any]) -> dict[str, Any]:
    return group["template"]["spec"]["containers"][0]


@pytest.mark.parametrize("ci_file", [None, *CI_FILES], ids=["chart-defaults", *ids])
def test_raycluster(ci_file: Path | None) -> None:
    v = merged_values(ci_file)
    cluster = one(manifests(ci_file), "RayCluster")
    spec = cluster["spec"]
    assert len(cluster["metadata"]["name"]) <= 41   # KubeRay cuts "<name>-head-svc" past 50
    assert spec["rayVersion"] == v["ray"]["version"]
    head = spec["headGroupSpec"]
    assert head["rayStartParams"]["num-cpus"] == "0", "no worker actors on the head"
    head_ports = {p["containerPort"] for p in head["template"]["spec"]["containers"][0]["ports"]}
    assert v["ray"]["clientPort"] in head_ports
    groups = {g["groupName"]: g for g in spec["workerGroupSpecs"]}
    assert set(groups) == {"prefill", "decode"}
    for role, g in groups.items():
        gv = v[role]
        assert g["replicas"] == g["minReplicas"] == g["maxReplicas"] == gv["replicas"]
        assert ray_resources(g) == {gv["rayResource"]["name"]: gv["rayResource"]["amount"]}
        assert all(isinstance(x, str) for x in g["rayStartParams"].values())
        pod = g["template"]["spec"]
        c = worker_container(g)
        gpus = gv["gpus"]
        res = c["resources"]
        if gpus:
            assert res["requests"]["nvidia.com/gpu"] == res["limits"]["nvidia.com/gpu"] == str(gpus)
        else:
            assert "nvidia.com/gpu" not in res.get("requests", {}) | res.get("limits", {})
        assert pod.get("nodeSelector", {}) == gv["nodeSelector"]
        assert pod.get("tolerations", []) == gv["tolerations"]
        assert pod.get("affinity", {}) == gv["affinity"]
        assert any(m["mountPath"] == "/dev/shm" for m in c["volumeMounts"])
    args = dict(chart_invocations(ci_file))["router"]
    gpw = float(args[args.index("--gpus-per-worker") + 1])
    assert gpw == v["prefill"]["gpus"] / v["prefill"]["workersPerPod"]


def test_gpu_values_request_gpus() -> None:
    path = CHART / "ci" / "gpu-2p2d.yaml"
    docs = manifests(path)
    groups = {g["groupName"]: g for g in one(docs, "RayCluster")["spec"]["workerGroupSpecs"]}
    for role in ("prefill", "decode"):
        assert groups[role]["replicas"] == 2
        assert worker_container(groups[role])["resources"]["limits"]["nvidia.com/gpu"] == "1"
        assert worker_container(groups[role])["image"].endswith("-cuda")
    args = parse_cli(dict(chart_invocations(path))["router"])
    assert (args.prefill, args.decode, args.gpus_per_worker) == (2, 2, 1.0)
    assert args.model == "/models/Llama-3.1-8B-Instruct"
    pod = one(docs, "Deployment")["spec"]["template"]["spec"]
    assert {"name": "model", "persistentVolumeClaim": {"claimName": "llama-3-1-8b-instruct", "readOnly": True}} \
        in pod["volumes"]
    assert not any("nvidia.com/gpu" in str(c.get("resources")) for c in pod["containers"])
    # The CPU default requests no GPU anywhere and uses the CPU image.
    cpu = manifests(CHART / "ci" / "cpu-default.yaml")
    assert "nvidia.com/gpu" not in json.dumps(cpu)
    assert all(c["image"].endswith("-cpu") for d in cpu for c in containers(d))


@pytest.mark.parametrize("ci_file", [None, *CI_FILES], ids=["chart-defaults", *ids])
def test_router_ports_and_probes(ci_file: Path | None) -> None:
    docs = manifests(ci_file)
    deploy = one(docs, "Deployment")
    assert deploy["spec"]["replicas"] == 1 and deploy["spec"]["strategy"]["type"] == "Recreate"
    c = router_container(docs)
    ports = {p["name"]: p["containerPort"] for p in c["ports"]}
    assert ports == {"grpc": 50051, "http": 8000}
    svc = one(docs, "Service")
    assert {(p["name"], p["port"], p["targetPort"]) for p in svc["spec"]["ports"]} \
        == {("grpc", 50051, "grpc"), ("http", 8000, "http")}
    pod_labels = deploy["spec"]["template"]["metadata"]["labels"]
    assert svc["spec"]["selector"].items() <= pod_labels.items()

    assert c["readinessProbe"]["grpc"]["port"] == 50051
    assert c["livenessProbe"]["httpGet"] == {"path": "/health", "port": "http"}
    start = c["startupProbe"]
    assert start["httpGet"]["path"] == "/health"
    budget = start.get("initialDelaySeconds", 0) + start["failureThreshold"] * start["periodSeconds"]
    assert budget >= STARTUP_BUDGET_S, f"startup probe gives {budget}s for model loading"


@pytest.mark.parametrize("ci_file", [None, *CI_FILES], ids=["chart-defaults", *ids])
def test_api_key_wiring(ci_file: Path | None) -> None:
    v = merged_values(ci_file)["apiKey"]
    docs = manifests(ci_file)
    env = {e["name"]: e for e in router_container(docs).get("env", [])}
    secrets = [d for d in docs if d["kind"] == "Secret"]
    if not (v["value"] or v["existingSecret"]):
        assert "PDSERVE_API_KEY" not in env and not secrets
        return
    ref = env["PDSERVE_API_KEY"]["valueFrom"]["secretKeyRef"]
    assert ref["key"] == v["existingSecretKey"]
    if v["existingSecret"]:
        assert ref["name"] == v["existingSecret"] and not secrets
    else:
        secret = one(docs, "Secret")
        assert ref["name"] == secret["metadata"]["name"]
        assert base64.b64decode(secret["data"][ref["key"]]).decode() == v["value"]
    # Only the router needs the key; Ray pods never see it.
    cluster = one(docs, "RayCluster")
    assert "PDSERVE_API_KEY" not in json.dumps(cluster)


@pytest.mark.parametrize("ci_file", [None, *CI_FILES], ids=["chart-defaults", *ids])
def test_servicemonitor(ci_file: Path | None) -> None:
    v = merged_values(ci_file)["monitoring"]["serviceMonitor"]
    docs = manifests(ci_file)
    monitors = [d for d in docs if d["kind"] == "ServiceMonitor"]
    if not v["enabled"]:
        assert monitors == []
        return
    sm = one(docs, "ServiceMonitor")
    assert sm["apiVersion"] == "monitoring.coreos.com/v1"
    assert v["labels"].items() <= sm["metadata"]["labels"].items()
    svc = one(docs, "Service")
    assert sm["spec"]["selector"]["matchLabels"].items() <= svc["metadata"]["labels"].items()
    assert sm["spec"]["namespaceSelector"]["matchNames"] == [NAMESPACE]
    [endpoint] = sm["spec"]["endpoints"]
    assert endpoint["port"] in {p["name"] for p in svc["spec"]["ports"]} and endpoint["path"] == "/metrics"
    # With an API key the router guards /metrics too: the scrape sends the same Secret.
    env = {e["name"]: e for e in router_container(docs).get("env", [])}
    if "PDSERVE_API_KEY" in env:
        auth = endpoint["authorization"]
        assert auth["type"] == "Bearer"
        assert auth["credentials"] == env["PDSERVE_API_KEY"]["valueFrom"]["secretKeyRef"]
    else:
        assert "authorization" not in endpoint


def test_monitoring_values_use_existing_secret_and_servicemonitor() -> None:
    path = CHART / "ci" / "monitoring.yaml"
    kinds = {d["kind"] for d in manifests(path)}
    assert "ServiceMonitor" in kinds and "Secret" not in kinds


def test_default_model_is_prepared_in_every_pod_that_loads_it() -> None:
    docs = manifests(CHART / "ci" / "cpu-default.yaml")
    pods = [one(docs, "Deployment")["spec"]["template"]["spec"]]
    pods += [g["template"]["spec"] for g in one(docs, "RayCluster")["spec"]["workerGroupSpecs"]]
    for pod in pods:
        inits = [parse_cli(args) for c in pod.get("initContainers", [])
                 for args in pdserve_invocations(c.get("command", []) + c.get("args", []))]
        assert [a.command for a in inits] == ["prepare-default-model"]


def test_notes_render() -> None:
    notes = render(CHART / "ci" / "monitoring.yaml")["pdserve/templates/NOTES.txt"]
    assert "port-forward svc/pdserve 8000 50051" in notes
    assert "PDSERVE_API_KEY" in notes and "ServiceMonitor" in notes


# ---- Grafana --------------------------------------------------------------------------

HISTOGRAMS = {"pdserve:time_to_first_token_seconds", "pdserve:inter_token_latency_seconds",
              "pdserve:e2e_request_latency_seconds", "pdserve:request_queue_time_seconds",
              "pdserve:kv_transfer_seconds"}
COUNTERS = {"pdserve:prompt_tokens_total", "pdserve:generation_tokens_total",
            "pdserve:request_success_total", "pdserve:request_failure_total",
            "pdserve:prefix_cache_queries_total", "pdserve:prefix_cache_hits_total",
            "pdserve:kv_transfer_bytes_total", "pdserve:kv_transfer_failures_total",
            "pdserve:routing_decisions_total"}
GAUGES = {"pdserve:num_requests_running", "pdserve:num_requests_waiting",
          "pdserve:kv_cache_usage_perc", "pdserve:worker_healthy", "pdserve:router_requests_inflight"}
# The series Prometheus stores for them (histograms: _bucket / _sum / _count).
EXPORTED = GAUGES | COUNTERS | {h + s for h in HISTOGRAMS for s in ("_bucket", "_sum", "_count")}


def dashboard_exprs() -> list[str]:
    board = json.loads(DASHBOARD.read_text())

    def walk(obj: Any) -> Iterator[str]:
        if isinstance(obj, dict):
            for key, value in obj.items():
                if key in ("expr", "definition") and isinstance(value, str):
                    yield value
                elif key == "query" and isinstance(value, str):
                    yield value
                else:
                    yield from walk(value)
        elif isinstance(obj, list):
            for item in obj:
                yield from walk(item)

    return list(walk(board))


def test_metric_list_matches_pdserve_metrics_module() -> None:
    """The names above are the ones pdserve/metrics.py registers (counters gain _total)."""
    source = (ROOT / "pdserve" / "metrics.py").read_text()
    registered = set(re.findall(r'"(pdserve:[a-z0-9_:]+)"', source))
    expected = HISTOGRAMS | GAUGES | {c.removesuffix("_total") for c in COUNTERS}
    assert expected <= registered, f"not in pdserve/metrics.py: {sorted(expected - registered)}"


def test_dashboard_queries_only_exported_metrics() -> None:
    board = json.loads(DASHBOARD.read_text())
    names = {n for expr in dashboard_exprs() for n in re.findall(r"pdserve:[a-z0-9_:]+", expr)}
    unknown = names - EXPORTED
    assert not unknown, f"the dashboard queries series pdserve does not export: {sorted(unknown)}"
    used = {n.removesuffix("_bucket").removesuffix("_sum").removesuffix("_count") for n in names}
    missing = (HISTOGRAMS | COUNTERS | GAUGES) - used
    assert not missing, f"not on the dashboard: {sorted(missing)}"
    variables = {v["name"]: v for v in board["templating"]["list"]}
    assert variables["datasource"]["type"] == "datasource" and variables["datasource"]["query"] == "prometheus"
    assert variables["model_name"]["type"] == "query"
    for expr in dashboard_exprs():
        if "histogram_quantile" in expr:
            assert "_bucket" in expr and "rate(" in expr, expr
    for panel in board["panels"]:
        for target in panel.get("targets", []):
            assert target["datasource"]["uid"] == "${datasource}", panel["title"]
            assert 'model_name=~"$model_name"' in target["expr"], panel["title"]


def test_dashboard_quantiles() -> None:
    exprs = dashboard_exprs()
    for h in HISTOGRAMS - {"pdserve:kv_transfer_seconds"}:
        qs = {q for e in exprs if f"{h}_bucket" in e for q in re.findall(r"histogram_quantile\(([0-9.]+)", e)}
        assert qs >= {"0.5", "0.9", "0.99"}, h
    assert any("histogram_quantile(0.9," in e and "kv_transfer_seconds_bucket" in e for e in exprs)


# ---- Ray cluster launcher config and image -------------------------------------------------

def test_ray_cluster_yaml() -> None:
    ray = pytest.importorskip("ray")
    jsonschema = pytest.importorskip("jsonschema")
    config = yaml.safe_load(RAY_CLUSTER.read_text())
    schema = json.loads((Path(ray.__file__).parent / "autoscaler" / "ray-schema.json").read_text())
    jsonschema.validate(config, schema)
    types = config["available_node_types"]
    advertised = {r for t in types.values() for r in t.get("resources", {})}
    assert {"pdserve_prefill", "pdserve_decode"} <= advertised
    assert not types[config["head_node_type"]]["resources"], "the head runs no worker actor"
    assert any("pdserve" in cmd and "install" in cmd for cmd in config["setup_commands"])
    # The commands the comments show parse with the CLI.
    comment = "\n".join(line.lstrip("# ") for line in RAY_CLUSTER.read_text().splitlines()
                        if line.startswith("#")).replace("\\\n", " ")
    serves = [parse_cli(shlex.split(line)[1:]) for line in comment.splitlines()
              if line.startswith("pdserve serve")]
    assert serves and serves[0].ray_address == "auto"
    assert (serves[0].prefill_ray_resource, serves[0].decode_ray_resource) == ("pdserve_prefill", "pdserve_decode")


def test_dockerfile() -> None:
    text = DOCKERFILE.read_text()
    assert 'ENTRYPOINT ["pdserve"]' in text
    assert re.search(r"^EXPOSE 50051 8000$", text, re.M)
    assert re.search(r"^ARG VARIANT=cpu$", text, re.M) and "FROM base-${VARIANT}" in text
    ray_version = re.search(r"^ARG RAY_VERSION=(\S+)$", text, re.M).group(1)
    assert ray_version == merged_values(None)["ray"]["version"], "image Ray != RayCluster rayVersion"
    cmd = json.loads(re.search(r"^CMD (\[.*\])$", text, re.M).group(1))
    parse_cli(cmd)
    for line in re.findall(r"pdserve (prepare-default-model[^;\n]*)", text):
        parse_cli(shlex.split(line))


# ---- docs stay true ------------------------------------------------------------------------

def leaf_keys(values: dict[str, Any], prefix: str = "") -> Iterator[str]:
    """values.yaml keys as the chart README's table lists them (maps of free-form
    Kubernetes or Ray settings count as one key)."""
    for key, value in values.items():
        if isinstance(value, dict) and value and key not in ("resources", "initResources", "rayStartParams"):
            yield from leaf_keys(value, f"{prefix}{key}.")
        else:
            yield f"{prefix}{key}"


def test_chart_readme_lists_every_value() -> None:
    values = yaml.safe_load((CHART / "values.yaml").read_text())
    table = (CHART / "README.md").read_text().split("\n## Values\n", 1)[1]
    listed = re.findall(r"^\| `([^`]+)` \|", table, re.M)
    assert sorted(listed) == sorted(leaf_keys(values))


def test_docs_values_example_renders() -> None:
    """The 2 prefill + 2 decode example in docs/deploy.md is a valid values file."""
    text = (ROOT / "docs" / "deploy.md").read_text()
    block = re.search(r"```yaml\n(.*?)```", text, re.S).group(1)
    with helm.Chart.load(CHART) as chart:
        rendered = chart.render(helm.values_from_yaml(block), name=RELEASE, namespace=NAMESPACE)
    docs = [d for s, t in rendered.items() if not s.endswith("NOTES.txt") for d in yaml.safe_load_all(t) if d]
    [(name, args)] = [(c["name"], inv) for d in docs for c in containers(d)
                      for inv in pdserve_invocations(c.get("command", [])) if inv[:1] == ["serve"]]
    parsed = parse_cli(args)
    assert (parsed.prefill, parsed.decode, parsed.gpus_per_worker) == (2, 2, 1.0)
