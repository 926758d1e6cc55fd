"""Preferred stimuli for every neuron: ``neurotwin synthesize-all`` and its Kubernetes Indexed Job.

- Slicing: every (neuron count, shard count) splits into disjoint slices that cover every neuron.
- Same images as the service: a sweep's per-neuron request equals the one the synthesizer service
  builds for a request that names only the twin and the neuron, and its images are pixel for pixel
  those of ``neurotwin synthesize`` with the same seed.
- The Job (deploy/k8s/jobs/synthesize-all, and the README's sizing example) renders with
  ``kubectl kustomize`` and validates strictly against the Kubernetes schemas; its wiring (GPU,
  volumes, security, exit codes of the failure policy, the slice count) fits the command and the
  deployed overlays.
- Two indices run locally as their pods would (the rendered command, args and env, with
  ``JOB_COMPLETION_INDEX=0`` and ``1``, volumes mapped to folders), at once on one results folder:
  every neuron gets exactly one result, from its own slice, and the contact sheet covers all of them.
- Kill and restart: a slice run again leaves finished neurons untouched (same inode and mtime) and
  redoes a neuron whose staging folder a killed process left behind.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
import yaml
from neurotwin.cli import build_parser, main
from neurotwin.commands import synthesize_all
from neurotwin.engines.neuron_report import REPORT_FILES
from neurotwin.engines.neuron_sweep import (
    DEFAULT_BUDGETS,
    DEFAULT_GENERATOR,
    DEFAULT_IMAGES,
    neuron_request,
    run_slice,
    shard_neurons,
)
from neurotwin.engines.sweep_folder import SweepFolder, SweepSpec
from neurotwin.errors import InvalidInput
from neurotwin.runtimes.generators import DCGANGenerator, save_generator
from neurotwin.store import GENERATORS, ModelStore
from PIL import Image

from tests._models import make_predictor
from tests.test_deploy import (
    DOCKER,
    IMAGE_DOCKERFILES,
    K8S,
    K8S_VERSION,
    ROOT,
    Rewriter,
    _env_value,
    _has_cuda,
    _kubectl,
    _objects,
    parse_dockerfile,
    render,
)

JOB_DIR = K8S / "jobs" / "synthesize-all"
JOB_NAME = "neurotwin-synthesize-all"
NEURONS = 5  # not a multiple of the two test slices
POD_TIMEOUT_S = 240


# ---------------------------------------------------------------------------------------------
# Slicing and defaults


@pytest.mark.parametrize("count", [0, 1, 2, 5, 7, 89, 100])
@pytest.mark.parametrize("shards", [1, 2, 3, 4, 8, 13, 120])
def test_slices_are_disjoint_and_complete(count: int, shards: int) -> None:
    slices = [list(shard_neurons(count, i, shards)) for i in range(shards)]
    flat = [n for part in slices for n in part]
    assert sorted(flat) == list(range(count)), "every neuron exactly once"
    sizes = [len(part) for part in slices]
    assert max(sizes) - min(sizes) <= 1


@pytest.mark.parametrize(("index", "shards"), [(2, 2), (-1, 2), (0, 0)])
def test_bad_slices_are_refused(index: int, shards: int) -> None:
    with pytest.raises(InvalidInput):
        shard_neurons(10, index, shards)


def _add_generator(root: Path, name: str = DEFAULT_GENERATOR) -> None:
    torch.manual_seed(0)
    gan = DCGANGenerator(latent_dim=16, resolution=32, width=8, code_layer=2)
    with ModelStore(root).new_version(GENERATORS, name) as folder:
        save_generator(gan.eval(), folder, name)


def _store(root: Path, twin: str = "tiny") -> Path:
    make_predictor(root, twin, neurons=NEURONS)
    _add_generator(root)
    return root


def test_sweep_requests_equal_the_services(tmp_path: Path) -> None:
    """Same method, prior, budget, optimizer settings and objective as a plain service request."""
    from neurotwin.server.synthesizer import Settings, SynthesizerService
    from neurotwin.v1 import synthesizer_pb2 as pb

    settings = Settings(model_store=str(_store(tmp_path)), device="cpu")
    assert settings.default_generator == DEFAULT_GENERATOR
    for method, budget in DEFAULT_BUDGETS.items():
        assert settings.budget_for(method) == budget
    service = SynthesizerService(settings, start=False)
    try:
        loaded, expected = service.build(
            pb.SynthesizeRequest(model="tiny", objective=pb.Objective(neurons=[3]), num_images=DEFAULT_IMAGES)
        )
    finally:
        service.stop()
    spec = SweepSpec(
        "tiny", 1, DEFAULT_GENERATOR, 1, "gradient", DEFAULT_BUDGETS["gradient"], DEFAULT_IMAGES, 0,
        list(loaded.card.neuron_ids),
    )  # fmt: skip
    ours = neuron_request(loaded.pair, spec, 3)
    assert (ours.method, ours.budget, ours.n_images, ours.seed) == (
        expected.method,
        expected.budget,
        expected.n_images,
        expected.seed,
    )
    assert ours.gradient == expected.gradient
    assert (ours.transforms, ours.population) == (expected.transforms, expected.population)
    assert type(ours.objective) is type(expected.objective)
    assert ours.objective.neurons == expected.objective.neurons
    assert ours.objective.target == expected.objective.target == 3


def test_sweep_images_equal_the_synthesize_commands(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """End to end: a neuron's sweep images are pixel for pixel those of ``neurotwin synthesize``
    (the in-process synthesizer service) with the same seed, budget and image count."""
    store = str(_store(tmp_path / "store"))
    small = ["--model-store", store, "--budget", "3", "--num-images", "2", "--seed", "5"]
    assert main(["synthesize", "--model", "tiny", "--neuron", "3", "--out", str(tmp_path / "one"),
                 "--no-progress", *small]) == 0  # fmt: skip
    assert main(["synthesize-all", "--model", "tiny", "--out", str(tmp_path / "all"), "--concurrency", "1",
                 *small]) == 0  # fmt: skip
    capsys.readouterr()
    service = sorted((tmp_path / "one").glob("tiny_3_gradient_*.png"))
    sweep = sorted((tmp_path / "all" / "neurons").glob("00003-*/image_*.png"))
    assert len(service) == len(sweep) == 2
    for a, b in zip(service, sweep, strict=True):
        assert np.array_equal(np.asarray(Image.open(a)), np.asarray(Image.open(b))), (a, b)


# ---------------------------------------------------------------------------------------------
# The engine: a neuron whose job fails is reported and left without a result


class _TwinWithDeadNeuron(torch.nn.Module):
    """A differentiable twin whose last neuron's rate is NaN (a broken readout)."""

    input_height = input_width = 16

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.conv = torch.nn.Conv2d(3, 3, 3)

    def forward(self, images_nhwc: torch.Tensor) -> torch.Tensor:
        rates = torch.nn.functional.softplus(self.conv(images_nhwc.permute(0, 3, 1, 2) / 255).mean((2, 3)))
        # A constant: no gradient flows through it into the other neurons' scores.
        return torch.cat([rates, torch.full_like(rates[:, :1], float("nan"))], dim=1)


def test_failed_neuron_is_reported_and_the_others_are_written(tmp_path: Path) -> None:
    from neurotwin.engines.synthesis import ModelPair

    torch.manual_seed(0)
    prior = DCGANGenerator(latent_dim=8, resolution=16, width=4).eval().requires_grad_(False)
    pair = ModelPair(twin=_TwinWithDeadNeuron().eval(), prior=prior)
    spec = SweepSpec("dead", 1, "gan", 1, "gradient", 3, 2, 0, ["a", "b", "c", "dead"])
    folder = SweepFolder(tmp_path / "sweep")
    assert folder.claim(spec) == spec
    outcome = run_slice(pair, spec, folder, range(4), device=torch.device("cpu"), concurrency=3)
    assert sorted(outcome.done) == [0, 1, 2]
    assert list(outcome.failed) == [3] and "not finite" in outcome.failed[3]
    assert folder.read_result(spec, 3) is None and not folder.neuron_dir(spec, 3).exists()
    again = run_slice(pair, spec, folder, range(4), device=torch.device("cpu"), concurrency=3)
    assert sorted(again.skipped) == [0, 1, 2] and again.done == [] and list(again.failed) == [3]


def test_a_write_that_fails_halfway_leaves_nothing(tmp_path: Path) -> None:
    spec = SweepSpec("t", 1, "g", 1, "gradient", 2, 2, 0, ["a", "b"])
    folder = SweepFolder(tmp_path)
    folder.claim(spec)
    record = {"images": [{"file": "image_00.png"}, {"file": "image_01.png"}]}
    with pytest.raises(ValueError):
        # The second image is missing: the first is written into staging, then zip() gives up.
        folder.write_neuron(spec, 1, record, [b"png"], np.zeros((2, 3), np.float32))
    assert [p.name for p in folder.neurons.iterdir()] == []


# ---------------------------------------------------------------------------------------------
# In-process command runs


def _cli(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str, str]:
    code = main(["synthesize-all", *argv])
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def test_a_folder_keeps_its_sweep(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """Slices agree on one sweep: an unpinned twin follows the recorded version even after a newer
    one is published; different settings or a different pinned version are refused (exit 2)."""
    store = _store(tmp_path / "store")
    out = tmp_path / "sweep"
    common = ["--model-store", str(store), "--out", str(out), "--budget", "2", "--num-images", "1"]
    code, printed, _ = _cli(capsys, "--model", "tiny", *common, "--shard-index", "0", "--shard-count", "2")
    assert code == 0, printed
    make_predictor(store, "tiny", neurons=NEURONS + 2, seed=1)  # version 2, more neurons
    code, printed, _ = _cli(capsys, "--model", "tiny", *common, "--shard-index", "1", "--shard-count", "2")
    assert code == 0, printed
    index = (out / "index.json").read_text()
    assert f'"neuron_count": {NEURONS}' in index, "the completing slice writes the report"
    folder = SweepFolder(out)
    spec = folder.read_spec()
    assert spec is not None and spec.model_version == 1 and len(spec.neuron_ids) == NEURONS
    records = [folder.read_result(spec, n) for n in range(NEURONS)]
    assert all(r is not None and r["model_version"] == 1 for r in records)

    for extra, problem in (
        (["--model", "tiny:2"], "model_version 1 (asked: 2)"),
        (["--model", "tiny", "--seed", "7"], "seed 0 (asked: 7)"),
    ):
        before = sorted(p.name for p in (out / "neurons").iterdir())
        code, _, err = _cli(capsys, *extra, *common)
        assert code == synthesize_all.EXIT_CONFIG
        assert problem in err and err.count("\n") == 1, err
        assert sorted(p.name for p in (out / "neurons").iterdir()) == before


def test_faults_exit_2_with_one_line(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    store = _store(tmp_path / "store")
    out = str(tmp_path / "sweep")
    cases = [
        (["--model", "nope", "--model-store", str(store), "--out", out], "no predictor named 'nope'"),
        (["--model", "tiny", "--model-store", str(tmp_path / "none"), "--out", out], "does not exist"),
        (["--model", "tiny", "--model-store", str(store), "--out", out, "--shard-index", "3",
          "--shard-count", "3"], "shard index 3 is outside 0..2"),
        (["--model-store", str(store), "--out", out], "--model NAME[:VERSION] is required"),
        (["--out", str(tmp_path / "empty"), "--contact-sheet"], "no sweep here"),
    ]  # fmt: skip
    for argv, message in cases:
        code, _, err = _cli(capsys, *argv)
        assert code == synthesize_all.EXIT_CONFIG, argv
        assert message in err and err.count("\n") == 1, err
    with pytest.raises(SystemExit) as exc:
        build_parser(["synthesize-all"])[0].parse_args(["synthesize-all", "--out", out, "--concurr", "2"])
    assert exc.value.code == synthesize_all.EXIT_CONFIG, "no abbreviated flags"


def test_contact_sheet_mode_marks_missing_neurons(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    store = _store(tmp_path / "store")
    out = tmp_path / "sweep"
    argv = ["--model", "tiny", "--model-store", str(store), "--out", str(out), "--budget", "2"]
    code, printed, _ = _cli(capsys, *argv, "--num-images", "1", "--shard-index", "1", "--shard-count", "2")
    assert code == 0 and not (out / "index.json").exists(), "an incomplete sweep writes no report"
    code, printed, _ = _cli(capsys, "--out", str(out), "--contact-sheet")
    assert code == 0 and f"2 of {NEURONS} neurons, 3 missing" in printed
    index = yaml.safe_load((out / "index.json").read_text())
    assert index["missing"] == [0, 2, 4] and index["complete"] == 2
    sheet = np.asarray(Image.open(out / "contact_sheet.png").convert("RGB"))
    for entry in index["neurons"]:
        left, top, right, bottom = entry["sheet_box"]
        cell = sheet[top:bottom, left:right]
        grey = bool((cell == 200).all())
        assert grey == (entry["status"] == "missing"), entry
    assert (out / "index.csv").read_text().count(",missing,") == 3


# ---------------------------------------------------------------------------------------------
# Rendering and validation


def _render(tmp: Path, kustomization: dict[str, Any]) -> tuple[dict[str, Any], ...]:
    """Render a kustomization written into ``tmp`` (relative paths resolve from there)."""
    (tmp / "kustomization.yaml").write_text(yaml.safe_dump(kustomization, sort_keys=False))
    result = subprocess.run(
        [_kubectl(), "kustomize", str(tmp)], capture_output=True, text=True, timeout=120, check=False
    )
    assert result.returncode == 0, result.stderr
    return tuple(doc for doc in yaml.safe_load_all(result.stdout) if doc)


def _overlay(tmp: Path, patches: list[dict[str, Any]]) -> tuple[dict[str, Any], ...]:
    return _render(
        tmp,
        {
            "apiVersion": "kustomize.config.k8s.io/v1beta1",
            "kind": "Kustomization",
            "resources": [os.path.relpath(JOB_DIR, tmp)],
            "patches": patches,
        },
    )


def _readme_example(tmp: Path) -> tuple[dict[str, Any], ...]:
    """The site overlay that deploy/README.md shows for a sweep, rendered as written there."""
    text = (ROOT / "deploy" / "README.md").read_text()
    match = re.search(r"```yaml\n(# lab-synthesis/kustomization\.yaml\n.*?)```", text, re.S)
    assert match, "deploy/README.md: the lab-synthesis/kustomization.yaml example is gone"
    kustomization = yaml.safe_load(match.group(1))
    kustomization["resources"] = [
        os.path.relpath(ROOT / r.removeprefix("../"), tmp) for r in kustomization["resources"]
    ]
    return _render(tmp, kustomization)


def _validate_strictly(docs: tuple[dict[str, Any], ...]) -> None:
    import kubernetes_validate

    for doc in docs:
        try:
            kubernetes_validate.validate(doc, K8S_VERSION, strict=True)
        except kubernetes_validate.ValidationError as exc:
            path = ".".join(str(p) for p in exc.path)
            pytest.fail(f"{doc['kind']}/{doc['metadata']['name']}: {path}: {exc.message}")


def _container(job: dict[str, Any]) -> dict[str, Any]:
    (container,) = job["spec"]["template"]["spec"]["containers"]
    return container


def _env(container: dict[str, Any]) -> dict[str, str]:
    return {e["name"]: e.get("value") for e in container["env"]}


def _check_job(docs: tuple[dict[str, Any], ...]) -> dict[str, Any]:
    """Wiring of a rendered sweep Job against the command and the deployed gpu overlay."""
    job = _objects(docs, "Job")[JOB_NAME]
    spec = job["spec"]
    pod = spec["template"]["spec"]
    container = _container(job)
    deployed = render("gpu")
    (namespace,) = _objects(deployed, "Namespace")
    assert all(d["metadata"]["namespace"] == namespace for d in docs)
    assert spec["completionMode"] == "Indexed"
    assert 1 <= spec["parallelism"] <= spec["completions"]
    assert _env(container)[synthesize_all.COUNT_ENV] == str(spec["completions"]), "slices != completions"
    assert spec["backoffLimitPerIndex"] >= 1 and spec["podReplacementPolicy"] == "Failed"
    assert pod["restartPolicy"] == "Never"
    exit_actions = {
        value: rule["action"]
        for rule in spec["podFailurePolicy"]["rules"]
        if "onExitCodes" in rule
        for value in rule["onExitCodes"]["values"]
    }
    assert exit_actions == {
        synthesize_all.EXIT_CONFIG: "FailJob",
        synthesize_all.EXIT_NEURONS_FAILED: "FailIndex",
    }
    for rule in spec["podFailurePolicy"]["rules"]:
        assert rule.get("onExitCodes", {}).get("containerName", container["name"]) == container["name"]

    # Security and service account as the services' pods (the restricted Pod Security Standard).
    synthesizer = _objects(deployed, "Deployment")["neurotwin-synthesizer"]["spec"]["template"]["spec"]
    assert pod["securityContext"] == synthesizer["securityContext"]
    assert container["securityContext"] == synthesizer["containers"][0]["securityContext"]
    assert pod["serviceAccountName"] in _objects(deployed, "ServiceAccount")
    assert pod["automountServiceAccountToken"] is False

    # One GPU, tolerated taint, CPU and memory bounded; the device insists on CUDA.
    for kind in ("requests", "limits"):
        assert {"cpu", "memory"} <= set(container["resources"][kind])
        assert container["resources"][kind]["nvidia.com/gpu"] == 1
    assert {"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"} in pod["tolerations"]
    assert _env(container)[synthesize_all.DEVICE_ENV] == "cuda"

    # The model store read-only, the results on a shared volume of this kustomization.
    volumes = {v["name"]: v for v in pod["volumes"]}
    mounts = {m["mountPath"]: m for m in container["volumeMounts"]}
    args = container["args"]
    argv = container["command"][1:] + args
    parsed = build_parser(argv)[0].parse_args(argv)
    assert parsed.command == "synthesize-all" and container["command"] == ["neurotwin"]
    store_mount = mounts[parsed.model_store]
    assert store_mount["readOnly"] is True
    store_claim = volumes[store_mount["name"]]["persistentVolumeClaim"]
    assert store_claim["readOnly"] is True and store_claim["claimName"] in _objects(
        deployed, "PersistentVolumeClaim"
    )
    out_mount = next(m for path, m in mounts.items() if str(parsed.out).startswith(path.rstrip("/") + "/"))
    assert not out_mount.get("readOnly")
    results_claim = _objects(docs, "PersistentVolumeClaim")[
        volumes[out_mount["name"]]["persistentVolumeClaim"]["claimName"]
    ]
    assert results_claim["spec"]["accessModes"] == ["ReadWriteMany"], "all indices write it at once"
    assert "emptyDir" in volumes[mounts["/tmp"]["name"]]
    # The synthesizer image (under a site's registry name too), CUDA build.
    repository, _, tag = container["image"].rpartition("/")[2].partition(":")
    assert ("neurotwin/" + repository, "cuda") in IMAGE_DOCKERFILES and tag.endswith("-cuda")
    return job


def test_job_renders_and_validates_strictly(tmp_path: Path) -> None:
    docs = _render(
        tmp_path,
        {"apiVersion": "kustomize.config.k8s.io/v1beta1", "kind": "Kustomization",
         "resources": [os.path.relpath(JOB_DIR, tmp_path)]},
    )  # fmt: skip
    assert sorted(d["kind"] for d in docs) == ["Job", "PersistentVolumeClaim"]
    _validate_strictly(docs)
    _check_job(docs)


def test_readme_sizing_example_renders_consistently(tmp_path: Path) -> None:
    docs = _readme_example(tmp_path)
    _validate_strictly(docs)
    job = _check_job(docs)
    assert job["spec"]["completions"] != 4, "the example should change the slice count"
    assert _container(job)["image"].startswith("registry.example.org/")


# ---------------------------------------------------------------------------------------------
# Two indices run as their pods would


def _pod_process(
    docs: tuple[dict[str, Any], ...], index: int, volumes: dict[str, Path], tmp: Path
) -> subprocess.Popen[bytes]:
    """Start index ``index`` of the rendered Job as a local process; ``volumes`` maps volume names to
    local folders (the shared ones must be the same folder for every index)."""
    job = _objects(docs, "Job")[JOB_NAME]
    container = _container(job)
    mounts = {m["mountPath"]: volumes[m["name"]] for m in container["volumeMounts"]}
    rewrite = Rewriter({}, mounts)
    repository, _, tag = container["image"].partition(":")
    image = parse_dockerfile(DOCKER / IMAGE_DOCKERFILES[(repository, tag.rsplit("-", 1)[-1])])
    env = {k: rewrite(v) for k, v in image.env().items() if k != "PATH"}
    env.update({e["name"]: rewrite(_env_value(e, container, JOB_NAME)) for e in container["env"]})
    # What the Job controller adds to the pod of each index.
    env["JOB_COMPLETION_INDEX"] = str(index)
    if not _has_cuda():
        # The one change to the manifest: this machine has no GPU (as in test_deploy.py).
        env.update({k: "auto" for k, v in env.items() if k.endswith("_DEVICE") and v.startswith("cuda")})
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}"
    if "PYTHONPATH" in os.environ:
        env["PYTHONPATH"] = os.environ["PYTHONPATH"]
    argv = [str(a) for a in rewrite(container["command"] + container["args"])]
    argv[0] = str(Path(sys.executable).parent / argv[0])
    with open(tmp / f"index-{index}.log", "wb") as log:
        return subprocess.Popen(
            argv, env=env, cwd=rewrite(image.final.last("WORKDIR")), stdout=log, stderr=subprocess.STDOUT
        )


def _wait(process: subprocess.Popen[bytes], tmp: Path, index: int) -> str:
    """The index's log once it has exited 0 (as a Job counts an index complete)."""
    try:
        process.wait(timeout=POD_TIMEOUT_S)
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()
    text = (tmp / f"index-{index}.log").read_text(errors="replace")
    assert process.returncode == 0, f"index {index} exited with {process.returncode}:\n{text[-4000:]}"
    return text


def _synthesized(log: str) -> list[int]:
    return [int(n) for n in re.findall(r"\] neuron (\d+) \(", log)]


def _stamp(path: Path) -> tuple[int, int, bytes]:
    stat = path.stat()
    return stat.st_ino, stat.st_mtime_ns, path.read_bytes()


def _check_report(results: Path, spec: SweepSpec) -> None:
    folder = SweepFolder(results)
    index = yaml.safe_load((results / "index.json").read_text())
    assert index["neuron_count"] == len(spec.neuron_ids) and index["complete"] == len(spec.neuron_ids)
    assert index["missing"] == []
    sheet = np.asarray(Image.open(results / "contact_sheet.png").convert("RGB"))
    html = (results / "index.html").read_text()
    rows = (results / "index.csv").read_text().splitlines()[1:]
    assert [int(r.split(",")[0]) for r in rows] == list(range(len(spec.neuron_ids)))
    for n, entry in enumerate(index["neurons"]):
        record = folder.read_result(spec, n)
        assert record is not None and entry["neuron_id"] == spec.neuron_ids[n]
        best = folder.neuron_dir(spec, n) / record["images"][record["best_image"]]["file"]
        assert (results / entry["best_image"]) == best
        assert record["best_activation"] == max(i["activation"] for i in record["images"])
        # The neuron's cell on the sheet is its best image.
        left, top, right, bottom = entry["sheet_box"]
        with Image.open(best) as image:
            expected = image.convert("RGB").resize((right - left, bottom - top), Image.Resampling.BILINEAR)
        assert np.array_equal(sheet[top:bottom, left:right], np.asarray(expected)), f"cell of neuron {n}"
        assert all(f'src="{path}"' in html for path in entry["images"])


def test_two_indices_run_as_pods_cover_every_neuron_and_resume(tmp_path: Path) -> None:
    with tempfile.TemporaryDirectory(prefix="job-overlay-") as scratch:
        # A site overlay as in deploy/README.md: two slices; a tiny budget for the test's sake.
        docs = _overlay(
            Path(scratch),
            [
                {"patch": yaml.safe_dump({
                    "apiVersion": "batch/v1", "kind": "Job", "metadata": {"name": JOB_NAME},
                    "spec": {"completions": 2, "parallelism": 2, "template": {"spec": {"containers": [
                        {"name": "synthesize",
                         "env": [{"name": synthesize_all.COUNT_ENV, "value": "2"}]}]}}},
                })},
                {"target": {"kind": "Job", "name": JOB_NAME}, "patch": yaml.safe_dump([
                    {"op": "add", "path": "/spec/template/spec/containers/0/args/-", "value": v}
                    for v in ("--budget", "4", "--num-images", "2", "--concurrency", "2")
                ])},
            ],
        )  # fmt: skip
    _validate_strictly(docs)
    job = _check_job(docs)
    args = _container(job)["args"]
    twin = args[args.index("--model") + 1].partition(":")[0]

    # The volumes: the model store holds a test twin under the manifest's name and the default
    # generator; the results volume is one folder for both indices; /tmp is per pod.
    store = _store(tmp_path / "models", twin)
    results = tmp_path / "results"
    results.mkdir()
    volumes = {"models": store, "results": results}

    def start(index: int) -> subprocess.Popen[bytes]:
        scratch_dir = tmp_path / f"tmp-{index}"
        scratch_dir.mkdir(exist_ok=True)
        return _pod_process(docs, index, {**volumes, "tmp": scratch_dir}, tmp_path)

    first = [start(0), start(1)]
    logs = [_wait(p, tmp_path, i) for i, p in enumerate(first)]
    slices = [_synthesized(log) for log in logs]
    assert sorted(slices[0]) == [0, 2, 4] and sorted(slices[1]) == [1, 3], logs
    out = results / Path(args[args.index("--out") + 1]).name
    folder = SweepFolder(out)
    spec = folder.read_spec()
    assert spec is not None and spec.model == twin and len(spec.neuron_ids) == NEURONS
    for n in range(NEURONS):
        record = folder.read_result(spec, n)
        assert record is not None, f"neuron {n} has no result"
        assert record["shard"] == {"index": n % 2, "count": 2}
        assert len(record["images"]) == 2 and record["budget"] == 4 and record["steps"] == 4
        assert record["natural_max"] > 0 and record["best_ratio"] == pytest.approx(
            record["best_activation"] / record["natural_max"]
        )
    # Whichever index finished last found the sweep complete and wrote the report.
    _check_report(out, spec)

    # A pod of index 0 killed while writing neuron 2: its staging folder holds half the files.
    victim = folder.neuron_dir(spec, 2)
    partial = folder.neurons / f".partial-{2:05d}-killed"
    victim.rename(partial)
    (partial / "result.json").unlink()
    image = partial / "image_01.png"
    image.write_bytes(image.read_bytes()[: image.stat().st_size // 2])
    # Neuron 4's folder copied back by hand without its result file: incomplete, so redone too.
    (folder.neuron_dir(spec, 4) / "result.json").unlink()
    for name in REPORT_FILES:
        (out / name).unlink()
    kept = {n: _stamp(folder.neuron_dir(spec, n) / "result.json") for n in (0, 1, 3)}

    log = _wait(start(0), tmp_path, 0)
    assert sorted(_synthesized(log)) == [2, 4], log
    assert "2 synthesized, 1 skipped (already done), 0 failed, 1 partial results removed" in log
    assert not partial.exists()
    assert folder.read_result(spec, 2) is not None and folder.read_result(spec, 4) is not None
    assert {n: _stamp(folder.neuron_dir(spec, n) / "result.json") for n in kept} == kept
    _check_report(out, spec)

    # Index 1 again: nothing to do, nothing rewritten.
    log = _wait(start(1), tmp_path, 1)
    assert _synthesized(log) == [] and "2 already done" in log
    assert {n: _stamp(folder.neuron_dir(spec, n) / "result.json") for n in kept} == kept
