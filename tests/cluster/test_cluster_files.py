"""The cluster files in ``cluster/``: Ray's own offline validation, flora-ray's requirements, and broken copies.

``aws.yaml`` and ``gcp.yaml`` go through what ``ray up`` runs before it talks to a cloud: the JSON schema shipped
in the ray wheel (``ray/autoscaler/ray-schema.json``), ``prepare_config`` (merge with the provider's defaults,
setup-command merge, docker check, per-type worker bounds) and ``validate_config``. The provider bootstrap that
follows in ``ray up`` (``bootstrap_aws`` / ``bootstrap_gcp``, instance-type resource detection) needs boto3 or the
Google API client and cloud credentials, so it is not run here. Then flora-ray's own requirements: a head without
accelerator or CPUs for work, worker types that advertise the accelerator the code asks for and start from zero,
spot / preemptible workers, flora-ray's image (``cluster/Dockerfile``, built on Ray's image for the installed Ray and
Python) and no installs in the setup commands. The autoscaler's
bin-packing (``get_nodes_for``) must place the demands the code builds on those worker types. The KubeRay
``RayJob`` is checked for its structure and together with the manifests it needs (``kuberay-serviceaccount.yaml``,
``kuberay-data.yaml``): every pod runs as the service account that grants bucket access, every claim it mounts is
provided and mountable on many nodes, read-only, where ``data.root`` points; the run lives in the bucket; the
per-experiment command in ``cluster/README.md`` makes a valid RayJob for another recipe. The autoscaler config
``flora_ray.testing.fake_cluster`` writes for the local autoscaling test is checked against Ray's schema. Each check
must also reject a deliberately broken copy.
"""

import copy
import functools
import json
import re
import subprocess
import sys
from pathlib import Path

import jsonschema
import pytest
import ray
import yaml
from ray.autoscaler._private.node_provider_availability_tracker import NodeAvailabilitySummary
from ray.autoscaler._private.resource_demand_scheduler import _default_utilization_scorer, get_nodes_for
from ray.autoscaler._private.util import prepare_config, validate_config

from flora_ray.backends.ray import scaling_config
from flora_ray.config import ScalingConfig, load_config
from flora_ray.stages.search import trial_resources
from flora_ray.testing.fake_cluster import WORKER_NODE_TYPE, autoscaler_config

CLUSTER = Path(__file__).resolve().parents[2] / "cluster"
EXPERIMENTS = CLUSTER.parent / "experiments"
LAUNCHER_FILES = ("aws.yaml", "gcp.yaml")
IMAGE = f"rayproject/ray:{ray.__version__}-py{sys.version_info.major}{sys.version_info.minor}-gpu"
# flora-ray's image (cluster/Dockerfile, FROM IMAGE): the launcher and KubeRay files name it with placeholders.
PROJECT_IMAGE = "<REGISTRY>/flora-ray:<TAG>"
# Commands that would install packages on every new node (the image has them).
INSTALLERS = ("pip ", "pip3 ", "conda ", "uv ", "apt-get install", "apt install")
ACCELERATOR = ScalingConfig().accelerator


def load(name: str) -> dict:
    return yaml.safe_load((CLUSTER / name).read_text())


def ray_schema() -> dict:
    return json.loads((Path(ray.autoscaler.__file__).parent / "ray-schema.json").read_text())


# --- launcher files (ray up) ---------------------------------------------------------------------------------------


def check_launcher(config: dict) -> dict:
    """Ray's offline checks, then flora-ray's; returns the prepared config. Raises on the first problem."""
    jsonschema.validate(config, ray_schema())
    prepared = prepare_config(copy.deepcopy(config))
    validate_config(prepared)
    check_flora_launcher(prepared)
    return prepared


def worker_types(config: dict) -> dict[str, dict]:
    """Worker node types that advertise at least one unit of the accelerator the code asks for by default."""
    return {
        name: spec
        for name, spec in config["available_node_types"].items()
        if name != config["head_node_type"] and spec["resources"].get(ACCELERATOR, 0) >= 1
    }


def check_flora_launcher(config: dict) -> None:
    head = config["available_node_types"][config["head_node_type"]]
    if head["resources"].get(ACCELERATOR, 0) or head["resources"].get("CPU", 1):
        raise ValueError(f"head node type must advertise no {ACCELERATOR} and CPU 0, got {head['resources']}")
    workers = worker_types(config)
    if not workers:
        raise ValueError(f"no worker node type advertises {ACCELERATOR!r}")
    for name, spec in workers.items():
        if spec.get("min_workers", 0) != 0:
            raise ValueError(f"{name}: min_workers must be 0 (nodes follow demand), got {spec['min_workers']}")
        if not _is_spot(config["provider"]["type"], spec["node_config"]):
            raise ValueError(f"{name}: workers must be spot / preemptible")
    if config["docker"].get("image") != PROJECT_IMAGE:
        raise ValueError(
            f"docker image must be {PROJECT_IMAGE} (built from cluster/Dockerfile), got {config['docker']}"
        )
    for key in ("setup_commands", "worker_setup_commands"):
        installs = [command for command in config[key] if any(word in command for word in INSTALLERS)]
        if installs:
            raise ValueError(f"{key} installs on every new node (the image has it all): {installs}")


def test_dockerfile_starts_from_the_installed_ray_and_python():
    """The image the launcher and KubeRay files run is built on Ray's image for this environment's Ray and Python."""
    bases = [line.split()[1] for line in (CLUSTER / "Dockerfile").read_text().splitlines() if line.startswith("FROM ")]
    assert bases == [IMAGE]


def _is_spot(provider: str, node_config: dict) -> bool:
    if provider == "aws":
        return node_config.get("InstanceMarketOptions", {}).get("MarketType") == "spot"
    return any(item.get("preemptible") for item in node_config.get("scheduling", []))


@pytest.mark.parametrize("name", LAUNCHER_FILES)
def test_launcher_file_passes_ray_and_flora_checks(name):
    prepared = check_launcher(load(name))
    workers = worker_types(prepared)
    assert workers and all(spec["resources"]["CPU"] >= 1 for spec in workers.values())
    # prepare_config merged the common setup commands into the head's and the workers'.
    assert prepared["worker_setup_commands"][: len(prepared["setup_commands"])] == prepared["setup_commands"]
    assert sum(spec["max_workers"] for spec in workers.values()) >= prepared["max_workers"] >= 1


def readme_install_route() -> dict:
    """The YAML of cluster/README.md's "Without a registry" route: what replaces the image's contents."""
    readme = (CLUSTER / "README.md").read_text()
    section = readme[readme.index("**Without a registry") :]
    return yaml.safe_load(section.split("```yaml\n", 1)[1].split("```", 1)[0])


@pytest.mark.parametrize("name", LAUNCHER_FILES)
def test_readme_install_route_passes_ray_checks(name):
    """The documented alternative: the stock image, the lock and the repository installed by every node."""
    doc = {**load(name), **readme_install_route()}
    doc["docker"] = {**doc["docker"], "image": IMAGE}
    jsonschema.validate(doc, ray_schema())
    prepared = prepare_config(copy.deepcopy(doc))
    validate_config(prepared)
    assert prepared["file_mounts"]["~/flora-ray"] == "."
    setup = prepared["worker_setup_commands"]
    assert any("--require-hashes" in c and "--no-deps" in c and "-r ~/flora-ray/requirements.lock" in c for c in setup)
    assert any(c.endswith("--no-deps --no-build-isolation ~/flora-ray") for c in setup)
    assert not [c for c in setup if "pip" in c and "--no-deps" not in c], setup  # nothing beyond the lock


def _demands(config_file: Path | None = None, **overrides: str) -> dict[str, list[dict]]:
    """What the code asks Ray for: per training worker (Ray Train) and per evaluator (Ray Tune), unchanged."""
    cfg = load_config(config_file, [f"{k.replace('__', '.')}={v}" for k, v in overrides.items()])
    train = scaling_config(cfg.scaling)
    return {
        "training": [dict(train._resources_per_worker_not_none)] * train.num_workers,
        "search": [trial_resources(cfg)] * cfg.search.concurrency,
    }


def _place(config: dict, demands: list[dict]) -> tuple[dict, list[dict]]:
    scorer = functools.partial(
        _default_utilization_scorer, node_availability_summary=NodeAvailabilitySummary(node_availabilities={})
    )
    head = config["head_node_type"]
    return get_nodes_for(config["available_node_types"], {head: 1}, head, config["max_workers"], demands, scorer)


@pytest.mark.parametrize("name", LAUNCHER_FILES)
def test_autoscaler_places_the_code_demands_on_gpu_worker_types(name):
    config = check_launcher(load(name))
    demands = _demands(
        scaling__use_gpu="true", scaling__num_workers="4", search__gpus_per_trial="0.5", search__concurrency="4"
    )
    assert all(d[ACCELERATOR] > 0 for stage in demands.values() for d in stage)
    for stage, bundles in demands.items():
        added, unplaced = _place(config, bundles)
        assert not unplaced, f"{stage} demand {bundles} does not fit {name}'s node types"
        assert added and set(added) <= set(worker_types(config)), (stage, added)
    # A custom accelerator name that no node type advertises stays unplaced: names must match.
    _, unplaced = _place(config, _demands(scaling__use_gpu="true", scaling__accelerator="accel")["training"])
    assert unplaced


@pytest.mark.parametrize("name", LAUNCHER_FILES)
def test_deit_small_recipe_fits_within_max_workers(name):
    """The recipe cluster/README.md submits: 8 training workers of 8 CPUs + 1 GPU, 16 evaluators of 4 CPUs + 0.5."""
    config = check_launcher(load(name))
    for stage, bundles in _demands(EXPERIMENTS / "deit_small_imagenet.yaml").items():
        added, unplaced = _place(config, bundles)
        assert not unplaced, f"{stage}: {len(unplaced)} of {len(bundles)} units do not fit {name} ({added})"


@pytest.mark.parametrize("name", LAUNCHER_FILES)
def test_ray_data_decode_tasks_go_to_cpu_nodes_not_gpu_nodes(name):
    """``data.pipeline: ray_data``: 64 decode tasks of 1 CPU each start CPU-only nodes (no GPU paid for decoding)."""
    config = check_launcher(load(name))
    added, unplaced = _place(config, [{"CPU": 1}] * 64)
    assert not unplaced and added
    assert all("GPU" not in config["available_node_types"][node]["resources"] for node in added), added


def _set(path: tuple, value):
    def mutate(doc):
        node = doc
        for key in path[:-1]:
            node = node[key]
        node[path[-1]] = value

    return mutate


def _drop_worker_types(doc):
    doc["available_node_types"] = {doc["head_node_type"]: doc["available_node_types"][doc["head_node_type"]]}


def _unpin_image(doc):
    doc["docker"]["image"] = "rayproject/ray:latest-gpu"


def _install_on_nodes(doc):
    doc["setup_commands"].insert(0, "pip install -q torch==2.14.1 torchvision==0.29.1")


def _install_on_workers(doc):
    doc["worker_setup_commands"] = ["pip3 install -q timm"]


def _on_demand(doc):
    for name, spec in doc["available_node_types"].items():
        if name != doc["head_node_type"]:
            spec["node_config"].pop("InstanceMarketOptions", None)
            spec["node_config"].pop("scheduling", None)


BROKEN_LAUNCHER = {
    "max_workers_not_integer": (_set(("max_workers",), "eight"), jsonschema.ValidationError, "is not of type"),
    "unknown_top_level_key": (_set(("gpu_workers",), 4), jsonschema.ValidationError, "Additional properties"),
    "fractional_node_resource": (
        _set(("available_node_types", "gpu_1x", "resources", "GPU"), 0.5),
        jsonschema.ValidationError,
        "is not of type 'integer'",
    ),
    "head_type_missing": (_set(("head_node_type",), "nohead"), ValueError, "head_node_type"),
    "no_worker_types": (_drop_worker_types, ValueError, "no worker node type advertises"),
    "head_with_gpu": (_set(("available_node_types", "head", "resources"), {"CPU": 0, "GPU": 1}), ValueError, "head"),
    "workers_start_nonzero": (_set(("available_node_types", "gpu_1x", "min_workers"), 1), ValueError, "min_workers"),
    "on_demand_workers": (_on_demand, ValueError, "spot"),
    "unpinned_image": (_unpin_image, ValueError, "docker image"),
    "setup_installs": (_install_on_nodes, ValueError, "setup_commands installs"),
    "worker_setup_installs": (_install_on_workers, ValueError, "worker_setup_commands installs"),
}


@pytest.mark.parametrize("name", LAUNCHER_FILES)
@pytest.mark.parametrize("case", sorted(BROKEN_LAUNCHER))
def test_broken_launcher_file_fails(name, case):
    mutate, error, match = BROKEN_LAUNCHER[case]
    doc = load(name)
    mutate(doc)
    with pytest.raises(error, match=match):
        check_launcher(doc)


def test_fake_cluster_config_passes_ray_validation():
    """The autoscaler config flora_ray.testing.fake_cluster writes for the local autoscaling tests."""
    config = autoscaler_config({"CPU": 1, "accel": 1}, max_workers=2, idle_timeout_minutes=0.1)
    jsonschema.validate(config, ray_schema())  # a fractional idle timeout is allowed ("number")
    validate_config(config)
    head = config["available_node_types"][config["head_node_type"]]
    worker = config["available_node_types"][WORKER_NODE_TYPE]
    assert head["resources"] == {"CPU": 0}
    assert worker["min_workers"] == 0 and worker["resources"]["accel"] == 1
    with pytest.raises(ValueError, match="max_workers"):
        autoscaler_config(max_workers=0)
    broken = {**config, "idle_timeout_minutes": "soon"}
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.validate(broken, ray_schema())


# --- KubeRay RayJob ------------------------------------------------------------------------------------------------


def _containers(group: dict) -> list[dict]:
    return group["template"]["spec"]["containers"]


def _gpus(container: dict) -> int:
    resources = container.get("resources", {})
    return max(int(resources.get(part, {}).get("nvidia.com/gpu", 0)) for part in ("limits", "requests"))


def check_rayjob(doc: dict) -> None:
    """A RayJob running flora-ray on an autoscaling cluster: CPU-only head, GPU workers from zero."""
    if (doc.get("apiVersion"), doc.get("kind")) != ("ray.io/v1", "RayJob"):
        raise ValueError(f"not a ray.io/v1 RayJob: {doc.get('apiVersion')}/{doc.get('kind')}")
    spec = doc["spec"]
    if not spec.get("entrypoint", "").startswith("flora-ray run ") or "--address auto" not in spec["entrypoint"]:
        raise ValueError(f"entrypoint must run `flora-ray run ... --address auto`: {spec.get('entrypoint')!r}")
    if spec.get("shutdownAfterJobFinishes") is not True:
        raise ValueError("shutdownAfterJobFinishes must be true")
    cluster = spec["rayClusterSpec"]
    if cluster.get("enableInTreeAutoscaling") is not True:
        raise ValueError("enableInTreeAutoscaling must be true")
    if cluster.get("rayVersion") != ray.__version__:
        raise ValueError(f"rayVersion must be {ray.__version__}")
    head = cluster["headGroupSpec"]
    if any(_gpus(c) for c in _containers(head)) or str(head.get("rayStartParams", {}).get("num-cpus")) != "0":
        raise ValueError("the head group must have no GPUs and num-cpus 0")
    gpu_groups = [g for g in cluster.get("workerGroupSpecs", []) if all(_gpus(c) >= 1 for c in _containers(g))]
    if not gpu_groups:
        raise ValueError("no worker group with nvidia.com/gpu limits")
    for group in gpu_groups:
        if group.get("minReplicas") != 0 or group.get("maxReplicas", 0) < 1:
            raise ValueError(f"worker group {group.get('groupName')}: minReplicas must be 0 and maxReplicas >= 1")
    images = {c["image"] for g in [head, *cluster.get("workerGroupSpecs", [])] for c in _containers(g)}
    if images != {PROJECT_IMAGE}:
        raise ValueError(f"images must be {PROJECT_IMAGE} (built from cluster/Dockerfile), got {images}")
    runtime_env = yaml.safe_load(spec["runtimeEnvYAML"])
    if not runtime_env.get("working_dir"):
        raise ValueError("the runtime environment must ship the repository as working_dir")
    if {"pip", "conda", "uv"} & set(runtime_env):
        raise ValueError(f"the runtime environment installs per job (the image has it all): {runtime_env}")


def test_rayjob_structure():
    check_rayjob(load("kuberay.yaml"))


def _worker_group(doc):
    return doc["spec"]["rayClusterSpec"]["workerGroupSpecs"][0]


def _head_gpu(doc):
    _containers(doc["spec"]["rayClusterSpec"]["headGroupSpec"])[0]["resources"]["limits"]["nvidia.com/gpu"] = 1


def _worker_without_gpu(doc):
    for part in ("limits", "requests"):
        _containers(_worker_group(doc))[0]["resources"][part].pop("nvidia.com/gpu")


BROKEN_RAYJOB = {
    "wrong_api_version": (_set(("apiVersion",), "ray.io/v1alpha1"), "ray.io/v1 RayJob"),
    "wrong_kind": (_set(("kind",), "RayCluster"), "ray.io/v1 RayJob"),
    "entrypoint_not_flora": (_set(("spec", "entrypoint"), "python train.py"), "entrypoint"),
    "autoscaling_off": (_set(("spec", "rayClusterSpec", "enableInTreeAutoscaling"), False), "enableInTreeAutoscaling"),
    "kept_after_job": (_set(("spec", "shutdownAfterJobFinishes"), False), "shutdownAfterJobFinishes"),
    "head_with_gpu": (_head_gpu, "head group"),
    "worker_without_gpu": (_worker_without_gpu, "no worker group"),
    "no_worker_group": (_set(("spec", "rayClusterSpec", "workerGroupSpecs"), []), "no worker group"),
    "workers_start_nonzero": (lambda doc: _worker_group(doc).update(minReplicas=1), "minReplicas"),
    "stock_ray_image": (lambda doc: _containers(_worker_group(doc))[0].update(image=IMAGE), "images must be"),
    "runtime_env_pip": (_set(("spec", "runtimeEnvYAML"), 'working_dir: "x.zip"\npip: [torch==2.14.1]\n'), "installs"),
    "no_working_dir": (_set(("spec", "runtimeEnvYAML"), "env_vars: {A: b}\n"), "working_dir"),
}


@pytest.mark.parametrize("case", sorted(BROKEN_RAYJOB))
def test_broken_rayjob_fails(case):
    mutate, match = BROKEN_RAYJOB[case]
    doc = load("kuberay.yaml")
    mutate(doc)
    with pytest.raises(ValueError, match=match):
        check_rayjob(doc)


# --- KubeRay: the RayJob with the manifests it needs ---------------------------------------------------------------

K8S_MANIFESTS = ("kuberay-serviceaccount.yaml", "kuberay-data.yaml")
MULTI_NODE_MODES = {"ReadWriteMany", "ReadOnlyMany"}
ACCESS_ANNOTATIONS = ("eks.amazonaws.com/role-arn", "iam.gke.io/gcp-service-account")
DNS_LABEL = re.compile(r"^[a-z0-9]([-a-z0-9]{0,61}[a-z0-9])?$")


def manifests() -> list[dict]:
    return [doc for name in K8S_MANIFESTS for doc in yaml.safe_load_all((CLUSTER / name).read_text()) if doc]


def _pod_specs(rayjob: dict) -> list[tuple[str, dict]]:
    cluster = rayjob["spec"]["rayClusterSpec"]
    pods = [("head", cluster["headGroupSpec"]["template"]["spec"])]
    return pods + [(g["groupName"], g["template"]["spec"]) for g in cluster.get("workerGroupSpecs", [])]


def _argument(entrypoint: str, key: str) -> str | None:
    found = re.search(rf"(?:^|\s){re.escape(key)}=(\S+)", entrypoint)
    return found.group(1) if found else None


def check_pod(where: str, pod: dict, accounts: dict, claims: dict, data_root: str | None) -> None:
    """One pod template: its service account exists, its claims are provided, multi-node and mounted read-only,
    and a local ``data.root`` is mounted."""
    if pod.get("serviceAccountName") not in accounts:
        raise ValueError(f"{where}: serviceAccountName {pod.get('serviceAccountName')!r} is none of {sorted(accounts)}")
    claimed = {v["name"]: v["persistentVolumeClaim"] for v in pod.get("volumes", []) if "persistentVolumeClaim" in v}
    for volume, claim in claimed.items():
        if claim["claimName"] not in claims:
            raise ValueError(f"{where}: volume {volume} claims {claim['claimName']!r}, which no manifest provides")
        if not MULTI_NODE_MODES & set(claims[claim["claimName"]]["spec"]["accessModes"]):
            raise ValueError(f"{where}: claim {claim['claimName']!r} cannot be mounted on several nodes at once")
        if claim.get("readOnly") is not True:
            raise ValueError(f"{where}: claim {claim['claimName']!r} must be mounted readOnly (the data)")
    mounts = [m for c in pod["containers"] for m in c.get("volumeMounts", [])]
    for mount in mounts:
        if mount["name"] in claimed and mount.get("readOnly") is not True:
            raise ValueError(f"{where}: mount of {mount['name']} must be readOnly")
    if data_root and "://" not in data_root and not any(m["mountPath"] == data_root for m in mounts):
        raise ValueError(f"{where}: data.root {data_root} is not mounted")


def check_kuberay(rayjob: dict, docs: list[dict]) -> None:
    """The RayJob (``check_rayjob``) with its service account and claims (``docs``); the run in a bucket."""
    check_rayjob(rayjob)
    if not DNS_LABEL.match(rayjob["metadata"]["name"]):
        raise ValueError(f"metadata.name {rayjob['metadata']['name']!r} is not a DNS label")
    accounts = {d["metadata"]["name"]: d for d in docs if d["kind"] == "ServiceAccount"}
    claims = {d["metadata"]["name"]: d for d in docs if d["kind"] == "PersistentVolumeClaim"}
    for name, account in accounts.items():
        if not set(ACCESS_ANNOTATIONS) & set(account["metadata"].get("annotations", {})):
            raise ValueError(f"service account {name} grants no bucket access (none of {ACCESS_ANNOTATIONS})")
    entrypoint = rayjob["spec"]["entrypoint"]
    storage = _argument(entrypoint, "run.storage")
    if not storage or not storage.startswith(("s3://", "gs://")):
        raise ValueError(f"the run must live in a bucket: run.storage=s3://... or gs://... in {entrypoint!r}")
    for where, pod in _pod_specs(rayjob):
        check_pod(where, pod, accounts, claims, _argument(entrypoint, "data.root"))


def test_rayjob_with_its_service_account_and_data_claim():
    docs = manifests()
    check_kuberay(load("kuberay.yaml"), docs)
    assert {d["kind"] for d in docs} == {"ServiceAccount", "PersistentVolumeClaim", "Job"}


def test_data_copy_job_fills_the_claim_the_rayjob_mounts():
    """The Job that fills the data claim runs as the service account, writes where the RayJob's data.root is."""
    docs = manifests()
    job = next(d for d in docs if d["kind"] == "Job")["spec"]["template"]["spec"]
    accounts = {d["metadata"]["name"] for d in docs if d["kind"] == "ServiceAccount"}
    claim = next(d for d in docs if d["kind"] == "PersistentVolumeClaim")
    assert job["serviceAccountName"] in accounts and job["restartPolicy"] in ("OnFailure", "Never")
    assert [v["persistentVolumeClaim"]["claimName"] for v in job["volumes"]] == [claim["metadata"]["name"]]
    (container,) = job["containers"]
    assert container["image"] == PROJECT_IMAGE
    mount = container["volumeMounts"][0]
    assert mount.get("readOnly") is not True and mount["mountPath"] == _argument(
        load("kuberay.yaml")["spec"]["entrypoint"], "data.root"
    )
    assert "ReadWriteMany" in claim["spec"]["accessModes"]  # written once by the Job, then read by every pod
    compile("\n".join(container["command"][2:3]), "copy", "exec")  # the python -c program parses


def _readme_block(title: str) -> str:
    """The first fenced bash block after ``title`` in cluster/README.md."""
    readme = (CLUSTER / "README.md").read_text()
    return readme[readme.index(title) :].split("```bash\n", 1)[1].split("```", 1)[0]


@pytest.mark.parametrize("experiment", ["swin_tiny_imagenet", "deit_base_imagenet"])
def test_readme_makes_one_rayjob_per_experiment(experiment):
    """The documented command, run with ``kubectl apply`` replaced by printing, yields a valid RayJob named for the
    experiment, running that experiment's file (which exists)."""
    block = _readme_block("**One RayJob per experiment.**")
    command = block.replace("| kubectl apply -n <NAMESPACE> -f -", "")
    assert command != block and "kubectl" not in command
    out = subprocess.run(["bash", "-c", command.replace("EXP=swin_tiny_imagenet", f"EXP={experiment}")],
                         cwd=CLUSTER.parent, capture_output=True, text=True, check=True).stdout  # fmt: skip
    rayjob = yaml.safe_load(out)
    check_kuberay(rayjob, manifests())
    assert rayjob["metadata"]["name"] == "flora-ray-" + experiment.replace("_", "-")
    assert f"experiments/{experiment}.yaml" in rayjob["spec"]["entrypoint"]
    assert (EXPERIMENTS / f"{experiment}.yaml").is_file()


def _pods(doc):
    return [pod for _, pod in _pod_specs(doc)]


def _drop_account(index):
    return lambda doc, docs: _pods(doc)[index].pop("serviceAccountName")


def _claim(doc):
    return next(v for v in _pods(doc)[1]["volumes"] if "persistentVolumeClaim" in v)["persistentVolumeClaim"]


def _claim_doc(docs):
    return next(d for d in docs if d["kind"] == "PersistentVolumeClaim")


BROKEN_KUBERAY = {
    "head_without_account": (_drop_account(0), "head: serviceAccountName None"),
    "worker_without_account": (_drop_account(1), "gpu: serviceAccountName None"),
    "other_account": (lambda doc, docs: _pods(doc)[2].update(serviceAccountName="default"), "'default' is none"),
    "account_without_access": (
        lambda doc, docs: next(d for d in docs if d["kind"] == "ServiceAccount")["metadata"].pop("annotations"),
        "grants no bucket access",
    ),
    "claim_not_provided": (lambda doc, docs: _claim(doc).update(claimName="imagenet-pvc"), "which no manifest"),
    "claim_one_node": (lambda doc, docs: _claim_doc(docs)["spec"].update(accessModes=["ReadWriteOnce"]), "several"),
    "claim_writable": (lambda doc, docs: _claim(doc).pop("readOnly"), "mounted readOnly"),
    "mount_writable": (
        lambda doc, docs: _pods(doc)[1]["containers"][0]["volumeMounts"][0].pop("readOnly"),
        "must be readOnly",
    ),
    "data_not_mounted": (lambda doc, docs: _pods(doc)[1]["containers"][0]["volumeMounts"].pop(0), "is not mounted"),
    "run_on_the_head": (
        lambda doc, docs: doc["spec"].update(entrypoint=doc["spec"]["entrypoint"].split(" run.storage=")[0]),
        "must live in a bucket",
    ),
    "bad_name": (lambda doc, docs: doc["metadata"].update(name="flora_ray_deit"), "not a DNS label"),
}


@pytest.mark.parametrize("case", sorted(BROKEN_KUBERAY))
def test_broken_kuberay_fails(case):
    mutate, match = BROKEN_KUBERAY[case]
    doc, docs = load("kuberay.yaml"), manifests()
    mutate(doc, docs)
    with pytest.raises(ValueError, match=match):
        check_kuberay(doc, docs)
