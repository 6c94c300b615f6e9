"""The Kubernetes manifests cannot drift from the code they run.

- Every manifest of a built-in kind validates strictly against the Kubernetes 1.33
  schemas (kubernetes-validate), the kustomize overlays after their patches too.
  kustomize itself is not installed: `build()` below applies the few features the
  kustomizations use (resources, strategic-merge patches by kind/name, images) and
  refuses anything else, and patches must target objects, containers and volumes
  that exist.
  When kubectl is installed, `kubectl kustomize` must render the same objects.
- Custom resources: TrainJob, TrainingRuntime and JobSet validate against the
  `kubeflow-trainer-api` models, strictly (a field the model drops on a round trip is
  unknown to the API), and every Job template inside them against batch/v1 with
  kubernetes-validate. The PyTorchJob (legacy) is checked for what the operator needs.
- Every container's command line parses with the project's own CLI parser (with the
  variables Trainer's torch plugin injects, `$(VAR)` expanded as the kubelet does) and
  the config in the ConfigMap resolves; podFailurePolicy and the JobSet failurePolicy
  act on the trainer's exit statuses; the grace period covers the launcher's shutdown
  timeout, also when Kueue suspends a job.
"""

from __future__ import annotations

import copy
import os
import re
import shutil
import subprocess
from pathlib import Path

import kubernetes_validate
import pytest
import yaml

from conftest import REPO
from dist_train.errors import EXIT_BAD_INPUT, EXIT_PREEMPTED

K8S = REPO / "k8s"
KUBERNETES_VERSION = "1.33.0"
KUSTOMIZE_KEYS = {"apiVersion", "kind", "resources", "patches", "images"}
BUILDS = ("base", "overlays/cpu", "overlays/gpu", "pytorchjob", "trainjob", "jobset", "kueue")
CUSTOM_KINDS = {"PyTorchJob", "TrainJob", "TrainingRuntime", "JobSet"}
# Trainer's torch plugin (pkg/runtime/framework/plugins/torch): the trainer ancestor label, the
# container it fills in, the variables it owns, the port of node 0.
ANCESTOR_LABEL = "trainer.kubeflow.org/trainjob-ancestor-step"
TORCH_RESERVED_ENV = {"PET_NNODES", "PET_NPROC_PER_NODE", "PET_NODE_RANK", "PET_MASTER_ADDR", "PET_MASTER_PORT"}
TRAINER_PORT = 29500
KUEUE_QUEUE_LABEL = "kueue.x-k8s.io/queue-name"


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


def job_templates(objects: list[dict]) -> list[dict]:
    """The batch/v1 JobTemplateSpecs inside JobSets and TrainingRuntimes."""
    found = []
    for obj in objects:
        if obj["kind"] == "JobSet":
            found += [r["template"] for r in obj["spec"]["replicatedJobs"]]
        elif obj["kind"] == "TrainingRuntime":
            found += [r["template"] for r in obj["spec"]["template"]["spec"]["replicatedJobs"]]
    return found


def pod_specs(objects: list[dict]) -> list[dict]:
    specs = [obj["spec"]["template"]["spec"] for obj in objects if obj["kind"] == "Job"]
    specs += [template["spec"]["template"]["spec"] for template in job_templates(objects)]
    for obj in objects:
        if obj["kind"] == "PyTorchJob":
            specs += [replica["template"]["spec"] for replica in obj["spec"]["pytorchReplicaSpecs"].values()]
    return specs


def job_specs(objects: list[dict]) -> list[dict]:
    """Every batch/v1 JobSpec: plain Jobs and those inside JobSets and TrainingRuntimes."""
    return [o["spec"] for o in objects if o["kind"] == "Job"] + [t["spec"] for t in job_templates(objects)]


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


def validate_job_template(template: dict, owner: dict) -> None:
    """A JobTemplateSpec, checked as the jobTemplate of a CronJob (the built-in kind that holds one)."""
    validate({"apiVersion": "batch/v1", "kind": "CronJob", "metadata": {"name": owner["metadata"]["name"]},
              "spec": {"schedule": "@daily", "jobTemplate": template}})


def custom_model(kind: str):
    from kubeflow_trainer_api import models

    return {"TrainJob": models.TrainerV1alpha1TrainJob, "TrainingRuntime": models.TrainerV1alpha1TrainingRuntime,
            "JobSet": models.JobsetV1alpha2JobSet}[kind]


def dropped(original, round_trip, where: str = "") -> list[str]:
    """Fields of `original` that a model round trip lost or changed: unknown to the API."""
    if isinstance(original, dict):
        if not isinstance(round_trip, dict):
            return [where or "."]
        return [p for k, v in original.items()
                for p in ([f"{where}.{k}"] if k not in round_trip else dropped(v, round_trip[k], f"{where}.{k}"))]
    if isinstance(original, list):
        if not isinstance(round_trip, list) or len(original) != len(round_trip):
            return [where]
        return [p for i, (a, b) in enumerate(zip(original, round_trip)) for p in dropped(a, b, f"{where}[{i}]")]
    return [] if original == round_trip else [where]


def validate_custom(doc: dict) -> None:
    """The kubeflow-trainer-api model of the kind, strictly: wrong types fail, unknown fields too."""
    from pydantic import ValidationError

    try:
        obj = custom_model(doc["kind"]).from_dict(doc)
    except ValidationError as exc:
        pytest.fail(f"{key(doc)}: {str(exc)[:400]}", pytrace=False)
    unknown = dropped(doc, obj.to_dict())
    assert not unknown, f"{key(doc)}: fields unknown to {doc['apiVersion']} {doc['kind']}: {unknown}"
    for template in job_templates([doc]):
        validate_job_template(template, doc)


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
        if doc["kind"] in CUSTOM_KINDS:
            continue  # custom resources (or patches of them): validated after the build below
        assert validate(doc) == "1.33"


@pytest.mark.parametrize("folder", BUILDS)
def test_builds_validate_strictly(folder):
    for obj in build(K8S / folder):
        if obj["kind"] == "PyTorchJob":
            for replica in obj["spec"]["pytorchReplicaSpecs"].values():
                template = {"apiVersion": "v1", "kind": "PodTemplate",
                            "metadata": {"name": obj["metadata"]["name"]}, "template": replica["template"]}
                validate(template)
        elif obj["kind"] in CUSTOM_KINDS:
            validate_custom(obj)
        else:
            validate(obj)


def test_strict_custom_validation_catches_unknown_fields_and_types():
    [runtime] = [o for o in build(K8S / "trainjob") if o["kind"] == "TrainingRuntime"]
    typo = copy.deepcopy(runtime)
    typo["spec"]["mlPolicy"]["numNode"] = 2
    assert dropped(typo, custom_model("TrainingRuntime").from_dict(typo).to_dict()) == [".spec.mlPolicy.numNode"]
    from pydantic import ValidationError

    wrong = copy.deepcopy(only(build(K8S / "trainjob"), "TrainJob"))
    wrong["spec"]["trainer"]["numNodes"] = "2"
    with pytest.raises(ValidationError):
        custom_model("TrainJob").from_dict(wrong)


def canonical(value):
    """Named-item lists in name order (kustomize puts patched env entries first; order does not matter)."""
    if isinstance(value, dict):
        return {k: canonical(v) for k, v in value.items()}
    if isinstance(value, list):
        items = [canonical(v) for v in value]
        if items and all(isinstance(i, dict) and "name" in i for i in items):
            items.sort(key=lambda i: i["name"])
        return items
    return value


@pytest.mark.skipif(shutil.which("kubectl") is None, reason="kubectl is not installed")
@pytest.mark.parametrize("folder", BUILDS)
def test_kubectl_kustomize_renders_the_same_objects(folder):
    rendered = subprocess.run(["kubectl", "kustomize", str(K8S / folder)], capture_output=True, text=True,
                              timeout=60)
    assert rendered.returncode == 0, rendered.stderr
    theirs = {key(o): canonical(o) for o in yaml.safe_load_all(rendered.stdout) if o}
    ours = {key(o): canonical(o) for o in build(K8S / folder)}
    assert ours == theirs


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


def trainer_node(runtime: dict) -> tuple[dict, dict]:
    """The replicated Job Trainer treats as the trainer, and its `node` container."""
    [rjob] = [r for r in runtime["spec"]["template"]["spec"]["replicatedJobs"]
              if r["template"].get("metadata", {}).get("labels", {}).get(ANCESTOR_LABEL) == "trainer"]
    [node] = [c for c in rjob["template"]["spec"]["template"]["spec"]["containers"] if c["name"] == "node"]
    return rjob, node


def test_trainjob_and_runtime_have_what_kubeflow_trainer_needs():
    objects = build(K8S / "trainjob")
    train_job, runtime = only(objects, "TrainJob"), only(objects, "TrainingRuntime")
    assert train_job["apiVersion"] == runtime["apiVersion"] == "trainer.kubeflow.org/v1alpha1"
    name = train_job["metadata"]["name"]
    # The JobSet is named after the TrainJob; pod host names <name>-node-0-<i> are DNS labels.
    assert re.fullmatch(r"[a-z]([-a-z0-9]*[a-z0-9])?", name) and len(f"{name}-node-0-99") <= 63
    ref = train_job["spec"]["runtimeRef"]
    assert ref == {"apiGroup": "trainer.kubeflow.org", "kind": "TrainingRuntime", "name": runtime["metadata"]["name"]}
    policy = runtime["spec"]["mlPolicy"]
    assert "torch" in policy and not {"mpi", "jax", "xgboost", "flux"} & set(policy)  # one policy only
    rjob, node = trainer_node(runtime)
    assert rjob["replicas"] == 1  # Trainer's webhook: always 1 (the nodes are the Job's pods)
    # Without `trainer` the torch plugin injects no PET_* variables at all.
    trainer = train_job["spec"]["trainer"]
    assert trainer["numNodes"] >= 1 and isinstance(trainer.get("numProcPerNode", 1), int)
    for env in (trainer.get("env", []), node.get("env", [])):
        assert not TORCH_RESERVED_ENV & {e["name"] for e in env}  # the plugin owns these
    assert not train_job["spec"].get("suspend")  # only the Kueue overlay starts it suspended


def test_jobset_names_its_pods_for_the_rendezvous():
    jobset = only(build(K8S / "jobset"), "JobSet")
    network = jobset["spec"]["network"]
    assert network["enableDNSHostnames"] is True and network.get("publishNotReadyAddresses", True) is True
    [rjob] = jobset["spec"]["replicatedJobs"]
    assert rjob.get("replicas", 1) == 1
    spec = rjob["template"]["spec"]
    assert spec["completionMode"] == "Indexed" and spec["completions"] == spec["parallelism"]


def failure_rules(job_spec: dict, container: str) -> tuple[dict[str, set[int]], set[tuple[str, str]]]:
    by_action: dict[str, set[int]] = {}
    conditions = set()
    for rule in job_spec["podFailurePolicy"]["rules"]:
        if "onExitCodes" in rule:
            codes = rule["onExitCodes"]
            assert codes["operator"] == "In" and codes["containerName"] == container
            by_action.setdefault(rule["action"], set()).update(codes["values"])
        for condition in rule.get("onPodConditions", []):
            conditions.add((rule["action"], condition["type"]))
    return by_action, conditions


@pytest.mark.parametrize("folder", ("trainjob", "jobset"))
def test_jobset_failure_policy_fails_on_bad_input_and_retries_preemption(folder):
    """Exit 2: podFailurePolicy FailJob (the Job fails with reason PodFailurePolicy), and the first
    JobSet rule for that reason fails the JobSet. Exit 75: Ignore, the pod is replaced uncounted."""
    objects = build(K8S / folder)
    [obj] = [o for o in objects if o["kind"] in ("JobSet", "TrainingRuntime")]
    jobset_spec = obj["spec"] if obj["kind"] == "JobSet" else obj["spec"]["template"]["spec"]
    [job_spec] = job_specs(objects)
    [container] = job_spec["template"]["spec"]["containers"]
    by_action, _ = failure_rules(job_spec, container["name"])
    assert by_action["FailJob"] == {EXIT_BAD_INPUT} and by_action["Ignore"] == {EXIT_PREEMPTED}
    policy = jobset_spec["failurePolicy"]
    assert policy["maxRestarts"] >= 1  # other failures restart the group, which resumes
    rules = policy["rules"]
    assert all(re.fullmatch(r"[A-Za-z]([A-Za-z0-9_,:]*[A-Za-z0-9_])?", r["name"]) for r in rules)
    first = next(r for r in rules if not r.get("onJobFailureReasons") or "PodFailurePolicy" in r["onJobFailureReasons"])
    assert first["action"] == "FailJobSet" and not first.get("onJobFailureMessagePatterns")


def test_kueue_overlay_queues_the_trainjob_and_changes_nothing_else(tmp_path):
    from dist_train.launcher import shutdown_timeout

    queued, plain = build(K8S / "kueue"), build(K8S / "trainjob")
    train_job = only(queued, "TrainJob")
    queue = train_job["metadata"]["labels"][KUEUE_QUEUE_LABEL]
    assert re.fullmatch(r"[a-z0-9]([-a-z0-9]*[a-z0-9])?", queue)  # a LocalQueue name
    assert train_job["spec"]["suspend"] is True  # created suspended: Kueue unsuspends on admission
    without = copy.deepcopy(train_job)
    del without["metadata"]["labels"][KUEUE_QUEUE_LABEL], without["spec"]["suspend"]
    assert sorted(map(key, queued)) == sorted(map(key, plain))
    assert [without if key(o) == key(train_job) else o for o in queued] == plain
    # Kueue preempts by suspending: the pods get SIGTERM and must have time to commit a checkpoint
    # (the grace period against the resolved config: test_trainjob_command_parses_with_the_torch_plugin_env).
    config, _ = train_config(queued, tmp_path)
    deadline = yaml.safe_load(config.read_text())["preempt_deadline"]
    [pod] = pod_specs(queued)
    assert pod["terminationGracePeriodSeconds"] >= shutdown_timeout(deadline) + 10 > deadline


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


def expand(arg: str, env: dict[str, str]) -> str:
    """The kubelet's $(VAR) expansion in command and args: defined variables only, $$ escapes."""
    return re.sub(r"\$\$|\$\(([A-Za-z_][A-Za-z0-9_.-]*)\)",
                  lambda m: "$" if m.group(0) == "$$" else env.get(m.group(1), m.group(0)), arg)


def torch_plugin_env(train_job: dict, node_rank: str) -> dict[str, str]:
    """What Trainer's torch plugin sets in the `node` container (EnforceMLPolicy)."""
    name, trainer = train_job["metadata"]["name"], train_job["spec"]["trainer"]
    return {"PET_NNODES": str(trainer["numNodes"]), "PET_NPROC_PER_NODE": str(trainer.get("numProcPerNode", "auto")),
            "PET_NODE_RANK": node_rank, "PET_MASTER_ADDR": f"{name}-node-0-0.{name}",
            "PET_MASTER_PORT": str(TRAINER_PORT)}


def parse_container(container: dict, env: dict[str, str], config: tuple[Path, str], monkeypatch):
    """Parse the container's command line as `dist-train` would; returns (torchrun args, job config)."""
    from dist_train.cli import launch as launch_cli
    from dist_train.cli.main import build_parser
    from dist_train.launcher.plan import parse_torchrun_options, parse_train_command, split_argv

    for name in [k for k in os.environ if k.startswith("PET_")]:
        monkeypatch.delenv(name)
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    argv = [expand(a, env) for a in list(container.get("command", [])) + list(container.get("args", []))]
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


@pytest.mark.parametrize("folder", ("trainjob", "kueue"))
def test_trainjob_command_parses_with_the_torch_plugin_env(folder, tmp_path, monkeypatch):
    from dist_train.launcher import shutdown_timeout

    objects = build(K8S / folder)
    train_job = only(objects, "TrainJob")
    _, node = trainer_node(only(objects, "TrainingRuntime"))
    config = train_config(objects, tmp_path)
    name = train_job["metadata"]["name"]
    for node_rank in ("0", "1"):
        env = {**container_env(node, node_rank), **torch_plugin_env(train_job, node_rank)}
        torchrun, cfg = parse_container(node, env, config, monkeypatch)
        assert torchrun.node_rank == int(node_rank)
    assert torchrun.rdzv_backend == "c10d" and torchrun.rdzv_endpoint == f"{name}-node-0-0.{name}:{TRAINER_PORT}"
    assert torchrun.nnodes == str(train_job["spec"]["trainer"]["numNodes"])
    assert torchrun.nproc_per_node == str(train_job["spec"]["trainer"]["numProcPerNode"])
    assert torchrun.max_restarts >= 1
    assert cfg.checkpoint.run_dir.startswith("s3://") and cfg.checkpoint.resume == "auto"
    [pod] = pod_specs(objects)
    assert pod["terminationGracePeriodSeconds"] >= shutdown_timeout(cfg.train.preempt_deadline) + 10


def test_jobset_command_parses_and_matches_the_jobset(tmp_path, monkeypatch):
    from dist_train.launcher import shutdown_timeout

    objects = build(K8S / "jobset")
    jobset = only(objects, "JobSet")
    [rjob] = jobset["spec"]["replicatedJobs"]
    spec = rjob["template"]["spec"]
    pod = spec["template"]["spec"]
    [trainer] = pod["containers"]
    config = train_config(objects, tmp_path)
    for node_rank in ("0", "1"):
        torchrun, cfg = parse_container(trainer, container_env(trainer, node_rank), config, monkeypatch)
        assert torchrun.node_rank == int(node_rank)
    assert torchrun.nnodes == str(spec["completions"]) and torchrun.rdzv_backend == "c10d"
    host, port = torchrun.rdzv_endpoint.rsplit(":", 1)
    name = jobset["metadata"]["name"]
    subdomain = jobset["spec"]["network"].get("subdomain", name)
    assert host == f"{name}-{rjob['name']}-0-0.{subdomain}"  # JobSet's host name of pod 0
    assert int(port) == {p["name"]: p["containerPort"] for p in trainer["ports"]}["rdzv"]
    assert torchrun.max_restarts >= 1
    assert pod["terminationGracePeriodSeconds"] >= shutdown_timeout(cfg.train.preempt_deadline) + 10


@pytest.mark.parametrize("folder", ("base", "jobset", "trainjob"))
def test_pod_failure_policy_uses_the_trainers_exit_statuses(folder):
    [spec] = job_specs(build(K8S / folder))
    [trainer] = spec["template"]["spec"]["containers"]
    assert spec["template"]["spec"]["restartPolicy"] == "Never"  # required by podFailurePolicy
    assert spec["podReplacementPolicy"] == "Failed"  # the only value allowed with podFailurePolicy
    assert spec.get("backoffLimit") is not None or spec.get("backoffLimitPerIndex") is not None
    by_action, conditions = failure_rules(spec, trainer["name"])
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
