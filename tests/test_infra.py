"""The cluster and deployment files parse, and name what the tools accept (checked offline, against the
tools' own schemas and templates where they ship them)."""
import importlib
import inspect
import json
import re
import shlex
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parent.parent
INFRA = ROOT / "infra"
PYPROJECT = tomllib.loads((ROOT / "pyproject.toml").read_text())


def pinned(package: str) -> str:
    for requirement in PYPROJECT["project"]["dependencies"]:
        match = re.match(rf"{package}(\[[^\]]*\])?==([\w.]+)", requirement)
        if match:
            return match.group(2)
    raise AssertionError(f"{package} is not pinned in pyproject.toml")


@pytest.mark.parametrize("cluster_file", ["ray-cluster.yaml", "ray-cluster-s3.yaml"])
def test_cluster_launcher_yaml_passes_rays_own_schema(cluster_file):
    from ray.autoscaler._private.util import prepare_config, validate_config

    config = prepare_config(yaml.safe_load((INFRA / cluster_file).read_text()))  # as `ray up` does
    validate_config(config)  # raises on a field the cluster launcher does not accept
    assert config["head_node_type"] in config["available_node_types"]
    assert any(t["node_config"]["InstanceType"].startswith("p4d") for t in config["available_node_types"].values())
    assert all("--disable-usage-stats" in c for c in config["head_start_ray_commands"][1:])
    if cluster_file.endswith("-s3.yaml"):  # no shared volume: every node reads the bucket through its own role
        assert not any("nfs" in c or "/mnt/shared" in c for c in config["initialization_commands"])
        assert all(t["node_config"]["IamInstanceProfile"]["Name"] for t in config["available_node_types"].values())
        scratch = next(o.split("=", 1)[1] for o in config["docker"]["run_options"] if "FOURM_SCRATCH=" in o)
        assert any(o == f"-v {scratch}:{scratch}" for o in config["docker"]["run_options"])


def test_cluster_launcher_schema_check_can_fail():
    from ray.autoscaler._private.util import prepare_config, validate_config

    config = prepare_config(yaml.safe_load((INFRA / "ray-cluster.yaml").read_text()))
    config["max_wokers"] = 3
    with pytest.raises(Exception, match="max_wokers"):
        validate_config(config)


def _pod_spec_checks(spec: dict, gpu: bool, shared: bool = True) -> None:
    container = spec["template"]["spec"]["containers"][0]
    assert container["image"].endswith(":latest") and container["name"].startswith("ray-")
    if gpu:
        gpus = container["resources"]["limits"]["nvidia.com/gpu"]
        assert gpus.isdigit() and int(gpus) >= 1 and container["resources"]["requests"]["nvidia.com/gpu"] == gpus
    mounts = {m["mountPath"] for m in container["volumeMounts"]}
    volumes = {v["name"] for v in spec["template"]["spec"]["volumes"]}
    assert {m["name"] for m in container["volumeMounts"]} <= volumes
    if shared:
        assert "/mnt/shared" in mounts
    else:  # object storage: no shared volume; scratch space on the pod, credentials from its service account
        env = {e["name"]: e["value"] for e in container["env"]}
        assert "/mnt/shared" not in mounts and env["FOURM_SCRATCH"] in mounts
        assert spec["template"]["spec"]["serviceAccountName"]
        assert not any("persistentVolumeClaim" in v for v in spec["template"]["spec"]["volumes"])
    assert all(isinstance(v, str) for v in spec["rayStartParams"].values())  # KubeRay takes strings only


@pytest.mark.parametrize("shared", [True, False])
def test_kuberay_clusters_on_a_shared_volume_and_on_object_storage(shared):
    cluster = yaml.safe_load((INFRA / f"kuberay/raycluster{'' if shared else '-s3'}.yaml").read_text())
    assert (cluster["apiVersion"], cluster["kind"]) == ("ray.io/v1", "RayCluster")
    assert cluster["spec"]["rayVersion"] == pinned("ray")
    _pod_spec_checks(cluster["spec"]["headGroupSpec"], gpu=False, shared=shared)
    for group in cluster["spec"]["workerGroupSpecs"]:
        _pod_spec_checks(group, gpu=True, shared=shared)


@pytest.mark.parametrize("job_file", ["rayjob.yaml", "rayjob-pretrain.yaml"])
def test_kuberay_manifests_have_the_fields_the_crds_require(job_file):
    cluster = yaml.safe_load((INFRA / "kuberay/raycluster.yaml").read_text())
    job = yaml.safe_load((INFRA / "kuberay" / job_file).read_text())
    assert (cluster["apiVersion"], cluster["kind"]) == ("ray.io/v1", "RayCluster")
    assert (job["apiVersion"], job["kind"]) == ("ray.io/v1", "RayJob")
    for spec in (cluster["spec"], job["spec"]["rayClusterSpec"]):
        assert spec["rayVersion"] == pinned("ray")  # the image's Ray is the one the project pins
        _pod_spec_checks(spec["headGroupSpec"], gpu=False)
        for group in spec["workerGroupSpecs"]:
            assert group["minReplicas"] <= group["replicas"] <= group["maxReplicas"] and group["groupName"]
            _pod_spec_checks(group, gpu=True)
    ports = {p["containerPort"] for p in cluster["spec"]["headGroupSpec"]["template"]["spec"]["containers"][0]["ports"]}
    assert {6379, 8265} <= ports


@pytest.mark.parametrize("job_file, command", [("rayjob.yaml", "label"), ("rayjob-pretrain.yaml", "pretrain")])
def test_rayjob_entrypoint_is_a_valid_pipeline_command(job_file, command):
    from pipeline.cli import build_parser

    job = yaml.safe_load((INFRA / "kuberay" / job_file).read_text())
    words = shlex.split(job["spec"]["entrypoint"])
    assert words[:3] == ["python", "-m", "pipeline"]
    args = build_parser().parse_args(words[3:])
    assert args.command == command and args.profile == "paper"
    assert yaml.safe_load(job["spec"]["runtimeEnvYAML"])["env_vars"]["RAY_USAGE_STATS_ENABLED"] == "0"


def test_container_image_installs_the_project_on_a_cuda_base():
    lines = [line.strip() for line in (INFRA / "Dockerfile").read_text().splitlines()]
    instructions = [line for line in lines if line and not line.startswith("#")]
    assert instructions[0].startswith("FROM nvidia/cuda:") and "cudnn" in instructions[0]
    python = PYPROJECT["project"]["requires-python"]  # ">=3.11,<3.12"
    assert "3.11" in python and any("python3.11 -m venv" in line for line in instructions)
    copied = {line.split()[1] for line in instructions if line.startswith("COPY ")}
    for package in PYPROJECT["tool"]["setuptools"]["packages"]["find"]["include"]:
        assert package.rstrip("*") in copied
    assert any("pip install -e ." in line for line in instructions)


def test_work_pool_template_matches_prefects_process_template():
    default = json.loads(subprocess.run([str(Path(sys.executable).parent / "prefect"), "work-pool",
                                         "get-default-base-job-template", "--type", "process"],
                                        capture_output=True, text=True, timeout=120, check=True).stdout)
    ours = json.loads((INFRA / "prefect/work-pool.json").read_text())
    assert ours["job_configuration"] == default["job_configuration"]
    assert set(ours["variables"]["properties"]) == set(default["variables"]["properties"])
    env = ours["variables"]["properties"]["env"]["default"]
    assert env["RAY_ADDRESS"] and env["RAY_USAGE_STATS_ENABLED"] == "0"


@pytest.mark.parametrize("prefect_file", ["prefect.yaml", "prefect-s3.yaml"])
def test_prefect_yaml_deploys_every_flow_with_parameters_it_takes(prefect_file):
    from prefect.flows import Flow

    config = yaml.safe_load((INFRA / "prefect" / prefect_file).read_text())
    assert config["prefect-version"] == pinned("prefect")
    names = set()
    for deployment in config["deployments"]:
        path, attribute = deployment["entrypoint"].split(":")
        flow = getattr(importlib.import_module(path.removesuffix(".py").replace("/", ".")), attribute)
        assert isinstance(flow, Flow)
        assert set(deployment["parameters"]) <= set(inspect.signature(flow.fn).parameters)
        assert deployment["work_pool"]["name"] == "fourm-process"
        names.add(f"{flow.name}/{deployment['name']}")
    if prefect_file == "prefect-s3.yaml":  # every dataset path a URL in the bucket: no shared volume
        assert names == {f"{flow}/cc12m-s3" for flow in ("download", "pseudo-label", "train-tokenizers", "tokenize",
                                                          "pretrain", "evaluate", "generate", "cc12m-pipeline")}
        paths = [v for d in config["deployments"] for k, v in d["parameters"].items() if k != "profile"]
        assert paths and all(v.startswith("s3://") for v in paths), paths
        return
    assert names == {"download/cc12m-cluster", "pseudo-label/cc12m-cluster", "train-tokenizers/cc12m-cluster",
                     "tokenize/cc12m-cluster", "pretrain/cc12m-cluster", "evaluate/cc12m-cluster",
                     "transfer/imagenet1k-cluster", "generate/cc12m-cluster", "cc12m-pipeline/cc12m-cluster"}
