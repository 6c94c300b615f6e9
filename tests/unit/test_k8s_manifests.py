"""The Kubernetes manifests cannot drift from the code they run.

- Every manifest of a built-in kind validates strictly against the Kubernetes 1.33
  schemas (kubernetes-validate), the kustomize overlays after their patches too.
  kustomize itself is not installed: `build()` below applies the few features the
  kustomizations use (resources, strategic-merge patches by kind/name, images) and
  refuses anything else, and patches must target objects, containers and volumes
  that exist.
- The PyTorchJob (a custom resource) is checked for what the Kubeflow operator needs.
- Every container's command line parses with the project's own CLI parser and the
  config in the ConfigMap resolves; the podFailurePolicy's exit statuses are the
  trainer's; the grace period covers the launcher's shutdown timeout.
"""

from __future__ import annotations

import copy
import os
from pathlib import Path

import kubernetes_validate
import pytest
import yaml

from conftest import REPO
from dist_train.errors import EXIT_BAD_INPUT, EXIT_PREEMPTED

K8S = REPO / "k8s"
KUBERNETES_VERSION = "1.33.0"
KUSTOMIZE_KEYS = {"apiVersion", "kind", "resources", "patches", "images"}
BUILDS = ("base", "overlays/cpu", "overlays/gpu", "pytorchjob")


# --- a small kustomize --------------------------------------------------------------------------

def load_yaml(path: Path) -> list[dict]:
    return [doc for doc in yaml.safe_load_all(path.read_text()) if doc]


def kustomization(folder: Path) -> dict:
    [doc] = load_yaml(folder / "kustomization.yaml")
    assert doc["kind"] == "Kustomization", folder
    unknown = set(doc) - KUSTOMIZE_KEYS
    assert not unknown, f"{folder}: kustomize feature not covered by this test: {unknown}"
    return doc


def key(obj: dict) -> tuple[str, str]:
    return obj["kind"], obj["metadata"]["name"]


def merge(base, patch, where: str):
    """Strategic merge as kustomize does it for what these patches use: maps recursively, lists of
    named items by name (a name missing from the base is an error here: it would be a typo), other
    lists replaced."""
    if isinstance(base, dict) and isinstance(patch, dict):
        out = dict(base)
        for k, v in patch.items():
            out[k] = merge(base[k], v, f"{where}.{k}") if k in base else copy.deepcopy(v)
        return out
    if isinstance(base, list) and isinstance(patch, list) and all(isinstance(i, dict) and "name" in i
                                                                   for i in base + patch):
        out = [copy.deepcopy(i) for i in base]
        names = [i["name"] for i in out]
        for item in patch:
            if item["name"] in names and where.endswith(".env"):
                out[names.index(item["name"])] = copy.deepcopy(item)
            elif item["name"] in names:
                out[names.index(item["name"])] = merge(out[names.index(item["name"])], item, where)
            else:
                assert where.endswith(".env"), f"patch adds unknown item {item['name']!r} at {where}"
                out.append(copy.deepcopy(item))
        return out
    return copy.deepcopy(patch)


def build(folder: Path) -> list[dict]:
    spec = kustomization(folder)
    objects: list[dict] = []
    for entry in spec.get("resources", []):
        target = (folder / entry).resolve()
        objects += build(target) if target.is_dir() else load_yaml(target)
    by_key = {key(obj): i for i, obj in enumerate(objects)}
    assert len(by_key) == len(objects), f"{folder}: duplicate objects"
    for patch_entry in spec.get("patches", []):
        for patch in load_yaml(folder / patch_entry["path"]):
            assert key(patch) in by_key, f"{folder}: patch targets {key(patch)}, not in its resources"
            i = by_key[key(patch)]
            objects[i] = merge(objects[i], patch, key(patch)[0])
    for image in spec.get("images", []):
        hits = 0
        for container in all_containers(objects):
            name, _, tag = container["image"].partition(":")
            if name == image["name"]:
                container["image"] = f"{image.get('newName', name)}:{image.get('newTag', tag)}"
                hits += 1
        assert hits, f"{folder}: images entry {image['name']} matches no container"
    return objects


def pod_specs(objects: list[dict]) -> list[dict]:
    specs = [obj["spec"]["template"]["spec"] for obj in objects if obj["kind"] == "Job"]
    for obj in objects:
        if obj["kind"] == "PyTorchJob":
            specs += [replica["template"]["spec"] for replica in obj["spec"]["pytorchReplicaSpecs"].values()]
    return specs


def all_containers(objects: list[dict]) -> list[dict]:
    return [c for spec in pod_specs(objects) for c in spec["containers"]]


def only(objects: list[dict], kind: str) -> dict:
    [obj] = [o for o in objects if o["kind"] == kind]
    return obj


def referenced_files() -> tuple[set[Path], set[Path]]:
    resources, patches = set(), set()
    for kfile in K8S.rglob("kustomization.yaml"):
        spec = kustomization(kfile.parent)
        resources |= {(kfile.parent / r).resolve() for r in spec.get("resources", [])}
        patches |= {(kfile.parent / p["path"]).resolve() for p in spec.get("patches", [])}
    return resources, patches


def validate(doc: dict) -> str:
    """Strict schema validation; a failure is one readable line, not the schema's repr."""
    try:
        return kubernetes_validate.validate(doc, KUBERNETES_VERSION, strict=True)
    except kubernetes_validate.ValidationError as exc:
        problem = f"{key(doc)} at {'.'.join(str(p) for p in exc.path)}: {exc.message[:300]}"
    pytest.fail(problem, pytrace=False)


# --- structure and schema ------------------------------------------------------------------------

def test_every_manifest_is_part_of_a_kustomization():
    resources, patches = referenced_files()
    for path in K8S.rglob("*.yaml"):
        if path.name == "kustomization.yaml":
            continue
        if path.parent.name == "secrets":
            assert path.name.endswith(".template.yaml") and path.resolve() not in resources, path
            continue
        assert path.resolve() in resources | patches, f"{path} is in no kustomization"
    for target in resources | patches:
        assert target.exists(), f"kustomization names a missing {target}"


def test_the_installed_schemas_include_the_target_version():
    assert KUBERNETES_VERSION in kubernetes_validate.utils.all_versions()


BUILTIN_FILES = sorted(p for p in K8S.rglob("*.yaml") if p.name != "kustomization.yaml")


@pytest.mark.parametrize("path", BUILTIN_FILES, ids=lambda p: str(p.relative_to(K8S)))
def test_files_validate_strictly(path):
    for doc in load_yaml(path):
        if doc["kind"] == "PyTorchJob":
            continue  # a custom resource: test_pytorchjob_has_what_the_operator_needs
        assert validate(doc) == "1.33"


@pytest.mark.parametrize("folder", BUILDS)
def test_builds_validate_strictly(folder):
    for obj in build(K8S / folder):
        if obj["kind"] == "PyTorchJob":
            for replica in obj["spec"]["pytorchReplicaSpecs"].values():
                template = {"apiVersion": "v1", "kind": "PodTemplate",
                            "metadata": {"name": obj["metadata"]["name"]}, "template": replica["template"]}
                validate(template)
        else:
            validate(obj)


def test_pytorchjob_has_what_the_operator_needs():
    job = only(build(K8S / "pytorchjob"), "PyTorchJob")
    assert job["apiVersion"] == "kubeflow.org/v1"
    name = job["metadata"]["name"]
    assert len(name) <= 63 and name[0].isalpha() and all(c.isalnum() or c == "-" for c in name)  # DNS-1035
    spec = job["spec"]
    replicas = spec["pytorchReplicaSpecs"]
    assert set(replicas) <= {"Master", "Worker"} and "Worker" in replicas  # elastic jobs need workers
    assert replicas.get("Master", {}).get("replicas", 1) == 1
    elastic = spec["elasticPolicy"]
    assert elastic["rdzvBackend"] == "c10d"
    assert elastic["minReplicas"] <= replicas["Worker"]["replicas"] <= elastic["maxReplicas"]
    assert not ("nprocPerNode" in spec and "nProcPerNode" in elastic)  # the operator rejects both
    assert isinstance(spec["nprocPerNode"], str)
    for replica in replicas.values():
        assert replica["restartPolicy"] in ("Always", "OnFailure", "Never", "ExitCode")
        containers = replica["template"]["spec"]["containers"]
        assert all(c.get("image") for c in containers)
        [pytorch] = [c for c in containers if c["name"] == "pytorch"]  # the operator's container name
        ports = {p["name"]: p["containerPort"] for p in pytorch["ports"]}
        assert ports["pytorchjob-port"] == elastic["rdzvPort"]
    assert set(spec["runPolicy"]) <= {"cleanPodPolicy", "ttlSecondsAfterFinished", "activeDeadlineSeconds",
                                      "backoffLimit", "schedulingPolicy", "suspend", "managedBy"}


# --- the manifests against the code -------------------------------------------------------------

def train_config(objects: list[dict], tmp_path: Path) -> tuple[Path, str]:
    """The ConfigMap's train.yaml as a file, and where the pods mount it."""
    config_map = [o for o in objects if o["kind"] == "ConfigMap" and "train.yaml" in o.get("data", {})][0]
    path = tmp_path / "train.yaml"
    path.write_text(config_map["data"]["train.yaml"])
    [spec] = pod_specs(objects)
    [volume] = [v for v in spec["volumes"] if v.get("configMap", {}).get("name") == config_map["metadata"]["name"]]
    [mount] = [m for c in spec["containers"] for m in c["volumeMounts"] if m["name"] == volume["name"]]
    return path, mount["mountPath"] + "/train.yaml"


def container_env(container: dict, node_rank: str) -> dict[str, str]:
    env = {}
    for item in container.get("env", []):
        if "value" in item:
            env[item["name"]] = item["value"]
        elif "job-completion-index" in item["valueFrom"]["fieldRef"]["fieldPath"]:
            env[item["name"]] = node_rank
    return env


def operator_env(job: dict) -> dict[str, str]:
    """What the Kubeflow operator sets for an elastic PyTorchJob (pkg/controller.v1/pytorch/elastic.go)."""
    spec, elastic = job["spec"], job["spec"]["elasticPolicy"]
    return {"PET_RDZV_ENDPOINT": f"{job['metadata']['name']}-worker-0:{elastic['rdzvPort']}",
            "PET_RDZV_BACKEND": elastic["rdzvBackend"],
            "PET_NNODES": f"{elastic['minReplicas']}:{elastic['maxReplicas']}",
            "PET_MAX_RESTARTS": str(elastic["maxRestarts"]), "PET_NPROC_PER_NODE": spec["nprocPerNode"]}


def parse_container(container: dict, env: dict[str, str], config: tuple[Path, str], monkeypatch):
    """Parse the container's command line as `dist-train` would; returns (torchrun args, job config)."""
    from dist_train.cli import launch as launch_cli
    from dist_train.cli.main import build_parser
    from dist_train.launcher.plan import parse_torchrun_options, parse_train_command, split_argv

    for name in [k for k in os.environ if k.startswith("PET_")]:
        monkeypatch.delenv(name)
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    argv = list(container.get("command", [])) + list(container.get("args", []))
    if argv[:2] == ["tini", "--"]:
        argv = argv[2:]
    assert argv[0] == "dist-train", argv
    local_config, mounted_config = config
    argv = [a.replace(mounted_config, str(local_config)) for a in argv[1:]]
    args = build_parser().parse_args(argv)
    assert args.handler is launch_cli.run
    options, command = split_argv(args.launch_argv)
    torchrun = parse_torchrun_options(options, command)
    _, job = parse_train_command(command)
    return torchrun, job


@pytest.mark.parametrize("folder", ("base", "overlays/cpu", "overlays/gpu"))
def test_indexed_job_command_parses_and_matches_the_job(folder, tmp_path, monkeypatch):
    from dist_train.launcher import shutdown_timeout

    objects = build(K8S / folder)
    job, service = only(objects, "Job"), only(objects, "Service")
    spec = job["spec"]
    pod = spec["template"]["spec"]
    [trainer] = pod["containers"]
    config = train_config(objects, tmp_path)
    for node_rank in ("0", "1"):
        torchrun, cfg = parse_container(trainer, container_env(trainer, node_rank), config, monkeypatch)
        assert torchrun.node_rank == int(node_rank)  # PET_NODE_RANK from the completion index: is_host
    assert spec["completionMode"] == "Indexed" and spec["completions"] == spec["parallelism"]
    assert torchrun.nnodes == str(spec["completions"])
    assert torchrun.rdzv_backend == "c10d"
    host, port = torchrun.rdzv_endpoint.rsplit(":", 1)
    assert host == f"{job['metadata']['name']}-0.{service['metadata']['name']}"  # pod 0 via the Service
    assert pod["subdomain"] == service["metadata"]["name"]
    container_ports = {p["name"]: p["containerPort"] for p in trainer["ports"]}
    [service_port] = service["spec"]["ports"]
    assert int(port) == service_port["port"] == container_ports[service_port["targetPort"]]
    assert torchrun.max_restarts >= 1
    assert cfg.checkpoint.run_dir.startswith("s3://") and cfg.checkpoint.resume == "auto"
    # The grace period covers the workers' preempt deadline plus the launcher's margin, with headroom.
    assert pod["terminationGracePeriodSeconds"] >= shutdown_timeout(cfg.train.preempt_deadline) + 10


def test_pytorchjob_command_parses(tmp_path, monkeypatch):
    from dist_train.launcher import shutdown_timeout

    objects = build(K8S / "pytorchjob")
    job = only(objects, "PyTorchJob")
    config = train_config(objects, tmp_path)
    for replica in job["spec"]["pytorchReplicaSpecs"].values():
        [container] = replica["template"]["spec"]["containers"]
        torchrun, cfg = parse_container(container, {**container_env(container, "0"), **operator_env(job)}, config,
                                        monkeypatch)
        assert torchrun.rdzv_endpoint == f"{job['metadata']['name']}-worker-0:{job['spec']['elasticPolicy']['rdzvPort']}"
        assert torchrun.nnodes == "2:2" and torchrun.max_restarts == 3
        grace = replica["template"]["spec"]["terminationGracePeriodSeconds"]
        assert grace >= shutdown_timeout(cfg.train.preempt_deadline) + 10


def test_pod_failure_policy_uses_the_trainers_exit_statuses():
    job = only(build(K8S / "base"), "Job")
    spec = job["spec"]
    [trainer] = spec["template"]["spec"]["containers"]
    assert spec["template"]["spec"]["restartPolicy"] == "Never"  # required by podFailurePolicy
    assert spec.get("backoffLimit") is not None or spec.get("backoffLimitPerIndex") is not None
    by_action: dict[str, set[int]] = {}
    conditions = set()
    for rule in spec["podFailurePolicy"]["rules"]:
        if "onExitCodes" in rule:
            codes = rule["onExitCodes"]
            assert codes["operator"] == "In" and codes["containerName"] == trainer["name"]
            by_action.setdefault(rule["action"], set()).update(codes["values"])
        for condition in rule.get("onPodConditions", []):
            conditions.add((rule["action"], condition["type"]))
    assert by_action == {"FailJob": {EXIT_BAD_INPUT}, "Ignore": {EXIT_PREEMPTED}}
    assert ("Ignore", "DisruptionTarget") in conditions


@pytest.mark.parametrize("folder", BUILDS)
def test_pods_have_resources_shm_and_s3_settings(folder):
    objects = build(K8S / folder)
    names = {key(o) for o in objects}
    [spec] = pod_specs(objects)
    [container] = spec["containers"]
    requests = container["resources"]["requests"]
    assert {"cpu", "memory"} <= set(requests)
    if folder == "overlays/gpu":
        assert requests["nvidia.com/gpu"] == container["resources"]["limits"]["nvidia.com/gpu"]
        assert container["image"].endswith(":cuda")
    [shm] = [v for v in spec["volumes"] if v.get("emptyDir", {}).get("medium") == "Memory"]
    assert any(m["name"] == shm["name"] and m["mountPath"] == "/dev/shm" for m in container["volumeMounts"])
    assert ("ServiceAccount", spec["serviceAccountName"]) in names
    sources = container["envFrom"]
    [settings] = [s["configMapRef"]["name"] for s in sources if "configMapRef" in s]
    assert ("ConfigMap", settings) in names
    [secret] = [s["secretRef"] for s in sources if "secretRef" in s]
    assert secret["optional"] is True  # a service-account role works without it
    [template] = load_yaml(K8S / "secrets" / "s3-credentials.template.yaml")
    assert template["metadata"]["name"] == secret["name"]
    assert all(v.startswith("<") and v.endswith(">") for v in template["stringData"].values())  # placeholders


def test_headless_service_selects_the_job_pods():
    objects = build(K8S / "base")
    job, service = only(objects, "Job"), only(objects, "Service")
    assert service["spec"]["clusterIP"] == "None" and service["spec"]["publishNotReadyAddresses"] is True
    # The Job controller labels its pods with batch.kubernetes.io/job-name.
    assert service["spec"]["selector"] == {"batch.kubernetes.io/job-name": job["metadata"]["name"]}
