"""The cluster manifests start an authenticated Ray control plane on a Python that installs Ray 2.60 and
tso, with the dashboard on loopback, GPU types that match their comments, and run directories and Ray
Train's storage on one shared mount. Static checks of the YAML: no Ray, no cluster."""

from __future__ import annotations

import re

import pytest
import yaml

from tests.helpers import REPO
from tso.config import parse_config

LAUNCHER = REPO / "cluster" / "ray-cluster.yaml"
RAYJOB = REPO / "cluster" / "rayjob.yaml"
RAY_IMAGE = re.compile(r"^rayproject/ray:2\.60\.\d+-py311(-gpu|-cpu)?$")
SHARED = "/mnt/tso"  # the launcher's shared file system
PVC = "/data"  # the RayJob's shared PVC


@pytest.fixture(scope="module")
def launcher():
    return yaml.safe_load(LAUNCHER.read_text())


@pytest.fixture(scope="module")
def rayjob():
    docs = list(yaml.safe_load_all(RAYJOB.read_text()))
    return {d["kind"]: d for d in docs}


def _env(container) -> dict:
    return {e["name"]: e.get("value", e.get("valueFrom")) for e in container.get("env", [])}


# ----------------------------------------------------------------------------- cluster launcher


def test_launcher_config_is_valid_for_ray(launcher):
    from ray.autoscaler._private.util import prepare_config, validate_config

    validate_config(prepare_config(yaml.safe_load(LAUNCHER.read_text())))


def test_launcher_starts_every_node_with_token_auth_and_the_dashboard_on_loopback(launcher):
    for key in ("head_start_ray_commands", "worker_start_ray_commands"):
        starts = [c for c in launcher[key] if "ray start" in c]
        assert starts, key
        for cmd in starts:  # on the same line: each launcher command runs in its own shell
            assert cmd.startswith("RAY_AUTH_MODE=token ray start"), cmd
    (head,) = [c for c in launcher["head_start_ray_commands"] if "ray start" in c]
    assert "--dashboard-host=127.0.0.1" in head and "0.0.0.0" not in LAUNCHER.read_text()
    # the token: generated on the user's machine and copied to Ray's default path on every node
    assert launcher["file_mounts"]["/home/ray/.ray/auth_token"] == "~/.ray/auth_token"
    assert "ray dashboard cluster/ray-cluster.yaml" in LAUNCHER.read_text()  # how to reach the dashboard


def test_launcher_boots_ray_2_60_images_on_python_3_11(launcher):
    docker = launcher["docker"]
    assert RAY_IMAGE.match(docker["head_image"]) and not docker["head_image"].endswith("-gpu")
    assert RAY_IMAGE.match(docker["worker_image"]) and docker["worker_image"].endswith("-gpu")
    assert any('"ray[serve,train,data]==2.60.0"' in c for c in launcher["setup_commands"])


def test_launcher_gpu_types_match_the_comments(launcher):
    text = LAUNCHER.read_text()
    workers = launcher["available_node_types"]["gpu_worker"]
    assert workers["node_config"]["InstanceType"] == "p4de.24xlarge"  # 8x A100 80 GB (p4d has 40 GB)
    assert "8x A100-SXM4-80GB" in text and "8x A100 80 GB" in text and "p4d.24xlarge" not in text
    assert workers["resources"]["GPU"] == 8 and workers["resources"]["trainer_node"] == 8
    head = launcher["available_node_types"]["head"]
    assert head["resources"]["GPU"] == 0 and head["node_config"]["InstanceType"].startswith("m6i.")


def test_launcher_mounts_shared_storage_at_one_path_and_the_job_uses_it(launcher):
    assert f"-v {SHARED}:{SHARED}" in launcher["docker"]["run_options"]  # every container, head and workers
    assert not launcher["docker"].get("head_run_options") and not launcher["docker"].get("worker_run_options")
    assert any("mount -t nfs4" in c and c.rstrip().endswith(f" {SHARED}") for c in launcher["initialization_commands"])
    submit = LAUNCHER.read_text().split("ray job submit", 1)[1]
    assert f"--set run_dir={SHARED}/runs/" in submit and f"--set train.storage_path={SHARED}/" in submit
    assert f'"TSO_HOME": "{SHARED}/' in submit
    assert "RAY_AUTH_MODE=token ray job submit --address http://127.0.0.1:8265" in LAUNCHER.read_text()


# ----------------------------------------------------------------------------- KubeRay RayJob


def _cluster(rayjob):
    return rayjob["RayJob"]["spec"]["rayClusterSpec"]


def _containers(rayjob):
    spec = _cluster(rayjob)
    head = spec["headGroupSpec"]["template"]["spec"]["containers"][0]
    workers = [g["template"]["spec"]["containers"][0] for g in spec["workerGroupSpecs"]]
    return head, workers


def test_rayjob_sets_token_auth_in_every_ray_container(rayjob):
    spec = _cluster(rayjob)
    assert spec["authOptions"]["mode"] == "token" and spec["authOptions"]["secretName"] == "tso-ray-auth"
    head, workers = _containers(rayjob)
    for c in [head, *workers]:  # container env: set before KubeRay's `ray start` runs
        env = _env(c)
        assert env["RAY_AUTH_MODE"] == "token", c["name"]
        assert env["RAY_AUTH_TOKEN"] == {"secretKeyRef": {"name": "tso-ray-auth", "key": "auth_token"}}, c["name"]
    assert "auth_token:" not in RAYJOB.read_text().split("---")[0].split("data:")[-1]  # no token in the file


def test_rayjob_keeps_the_dashboard_on_loopback_and_submits_from_the_head_pod(rayjob):
    spec = _cluster(rayjob)
    assert spec["headGroupSpec"]["rayStartParams"]["dashboard-host"] == "127.0.0.1"
    assert rayjob["RayJob"]["spec"]["submissionMode"] == "SidecarMode"  # reaches 127.0.0.1:8265 in the pod
    assert "0.0.0.0" not in RAYJOB.read_text() and "kubectl port-forward" in RAYJOB.read_text()


def test_rayjob_boots_a_ray_2_60_python_3_11_image(rayjob):
    assert _cluster(rayjob)["rayVersion"] == "2.60.0"
    head, workers = _containers(rayjob)
    assert {c["image"] for c in [head, *workers]} == {"tso:2.60.0-py311-gpu"}
    built_from = re.search(r"FROM (\S+)", RAYJOB.read_text()).group(1)
    assert RAY_IMAGE.match(built_from) and built_from.endswith("-gpu")


def test_rayjob_gpu_types_match_the_comments(rayjob):
    (group,) = _cluster(rayjob)["workerGroupSpecs"]
    pod = group["template"]["spec"]
    assert pod["nodeSelector"]["nvidia.com/gpu.product"] == "NVIDIA-A100-SXM4-80GB"
    assert pod["containers"][0]["resources"]["limits"]["nvidia.com/gpu"] == "8"
    assert "8x A100 80 GB" in RAYJOB.read_text()
    assert yaml.safe_load(yaml.safe_load(group["rayStartParams"]["resources"])) == {"trainer_node": 8}


def test_rayjob_mounts_one_shared_pvc_at_one_path_and_the_run_lives_there(rayjob, monkeypatch):
    spec = _cluster(rayjob)
    pods = [spec["headGroupSpec"]["template"]["spec"]] + [g["template"]["spec"] for g in spec["workerGroupSpecs"]]
    for pod in pods:
        claims = {v["name"]: v["persistentVolumeClaim"]["claimName"] for v in pod["volumes"] if "persistentVolumeClaim" in v}
        mounts = {m["name"]: m["mountPath"] for m in pod["containers"][0]["volumeMounts"]}
        assert claims == {"data": "tso-data"} and mounts["data"] == PVC
    env = yaml.safe_load(rayjob["RayJob"]["spec"]["runtimeEnvYAML"])["env_vars"]
    assert env["TSO_HOME"].startswith(PVC + "/")

    job = rayjob["RayJob"]["spec"]["entrypoint"].split()
    assert job[:2] == ["tso", "run"] and job[2] == "/configs/run.yaml"
    monkeypatch.setenv("TSO_HOME", env["TSO_HOME"])  # as the job's runtime env sets it for the driver
    cfg = parse_config(yaml.safe_load(rayjob["ConfigMap"]["data"]["run.yaml"]))
    assert cfg.run_dir.startswith(PVC + "/") and cfg.train.storage_path.startswith(PVC + "/")
    assert all(m.path.startswith(PVC + "/") for m in cfg.matrix.models) and cfg.judge.feedback.startswith(PVC + "/")
    assert cfg.train.resources_per_worker == {"trainer_node": 1} and cfg.train.num_workers == 8 and cfg.train.use_gpu
