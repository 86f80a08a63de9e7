"""Two Ray nodes on one machine, as `ray start` makes them on a real cluster: a head (`head_node`
resource) and a second node (`trainer_node` resource), both with token auth. One tiny stage trains
with ``train.resources_per_worker: {trainer_node: 1}`` from a driver that joins by address; the
placement records show the worker ran on the second node, and the shared-storage preflight probes
the nodes and names the one that does not see an input as the driver does.

The test starts both nodes with ``ray start --block`` in their own process groups and ends exactly
those (never ``ray stop``, which would stop every Ray cluster on the machine)."""

from __future__ import annotations

import json
import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest

from tests.helpers import REPO
from tests.toydata import arithmetic_pairs, write_pairs

pytestmark = [pytest.mark.ray, pytest.mark.slow, pytest.mark.timeout(300)]

RAY = str(Path(sys.executable).with_name("ray"))
GCS_PORTS = range(6391, 6400)
START_TIMEOUT_S = 90


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _gcs_port() -> int:
    for port in GCS_PORTS:
        with socket.socket() as s:
            try:
                s.bind(("0.0.0.0", port))
            except OSError:
                continue
            return port
    pytest.skip(f"no free GCS port in {GCS_PORTS}")


def _node_ports() -> list[str]:
    """Every port a node binds, chosen free: two raylets on one machine would otherwise both take the
    fixed defaults (the dashboard agent's 52365), and so would any other Ray cluster on the machine."""
    flags = ["--node-manager-port", "--object-manager-port", "--dashboard-agent-listen-port",
             "--dashboard-agent-grpc-port", "--runtime-env-agent-port", "--metrics-export-port"]
    return [x for f in flags for x in (f, str(_free_port()))]


def _stop(proc: subprocess.Popen) -> None:
    """End one `ray start --block` and its process group: SIGTERM makes it stop the node's processes."""
    try:
        os.killpg(proc.pid, signal.SIGTERM)
        proc.wait(30)
    except ProcessLookupError:
        return
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(10)


@pytest.fixture(scope="module")
def two_nodes():
    """Yields (address, env, temp root); env carries RAY_AUTH_MODE=token and the cluster's token."""
    # a short root: Ray's socket paths must stay under the Unix limit (pytest's tmp_path is too long)
    root = Path(tempfile.mkdtemp(prefix="tso2n-", dir="/tmp"))
    env = {**os.environ, "RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN": secrets.token_hex(16),
           "RAY_USAGE_STATS_ENABLED": "0", "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"}
    env.pop("RAY_ADDRESS", None)
    port = _gcs_port()
    address = f"127.0.0.1:{port}"
    procs: list[subprocess.Popen] = []
    logs = []

    def start(name: str, *args: str) -> None:
        logs.append(log := open(root / f"{name}.log", "w"))
        procs.append(subprocess.Popen([RAY, "start", "--block", "--disable-usage-stats", "--temp-dir", str(root / name),
                                       *args, *_node_ports()], env=env, cwd=root, stdout=log, stderr=subprocess.STDOUT,
                                      start_new_session=True))

    def wait_nodes(n: int) -> None:
        code = f"import ray; ray.init(address='{address}', log_to_driver=False); print(sum(x['Alive'] for x in ray.nodes()))"
        deadline = time.monotonic() + START_TIMEOUT_S
        while time.monotonic() < deadline:
            if any(p.poll() is not None for p in procs):
                break
            out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=60)
            if out.returncode == 0 and out.stdout.strip().splitlines()[-1:] == [str(n)]:
                return
            time.sleep(1)
        tails = "\n".join((root / f).read_text()[-2000:] for f in ("head.log", "trainer.log") if (root / f).exists())
        raise RuntimeError(f"the two-node cluster did not come up with {n} node(s):\n{tails}")

    try:
        start("head", "--head", "--port", str(port), "--num-cpus", "2", "--resources", '{"head_node": 1}',
              "--include-dashboard=false", "--ray-client-server-port", str(_free_port()))
        wait_nodes(1)
        start("trainer", "--address", address, "--num-cpus", "4", "--resources", '{"trainer_node": 1}')
        wait_nodes(2)
        yield address, env, root
    finally:
        for p in reversed(procs):
            _stop(p)
        left = subprocess.run(["pgrep", "-f", str(root)], capture_output=True, text=True).stdout.split()
        for pid in left:  # only processes whose command line names this test's temp root
            try:
                os.kill(int(pid), signal.SIGKILL)
            except ProcessLookupError:
                pass
        for log in logs:
            log.close()
        shutil.rmtree(root, ignore_errors=True)


DRIVER = """
import json, sys
from pathlib import Path
import ray
from tso.config import parse_config
from tso.train.ray_trainer import check_shared_storage, read_placement, train_policy

args = json.loads(sys.argv[1])
cfg = parse_config(args["config"])
res = train_policy(cfg, args["pairs"], out_dir=args["out"], stage=1, max_failures=0)
nodes = {n["NodeID"]: n["Resources"] for n in ray.nodes() if n["Alive"]}
# every node could host a 1-CPU worker: the preflight probes both
probed = check_shared_storage({"pairs file": args["pairs"]}, {"training directory": Path(args["out"])}, {"CPU": 1})
print("RESULT " + json.dumps({"policy_dir": res.policy_dir, "placement": read_placement(args["out"]),
                              "nodes": nodes, "probed_all": probed,
                              "driver_node": ray.get_runtime_context().get_node_id()}))
"""


def _driver(env: dict[str, str], address: str, code: str, *args: str, cwd: Path = REPO, timeout: int = 240):
    out = subprocess.run([sys.executable, "-c", code, *args], env={**env, "RAY_ADDRESS": address}, cwd=cwd,
                         capture_output=True, text=True, timeout=timeout)
    assert out.returncode == 0, (out.stdout[-3000:], out.stderr[-5000:])
    result = json.loads(next(line[7:] for line in out.stdout.splitlines() if line.startswith("RESULT ")))
    return {**result, "stdout": out.stdout}


def test_training_pinned_to_the_second_node_runs_there_and_writes_the_policy(two_nodes, tiny_model_dir, tmp_path):
    address, env, _ = two_nodes
    pairs = write_pairs(arithmetic_pairs(8, seed=3), tmp_path / "pairs.parquet")
    out = tmp_path / "train"
    config = {"run_dir": str(tmp_path / "run"),
              "matrix": {"base": "tiny-v1", "models": [
                  {"name": "tiny-v1", "path": str(tiny_model_dir), "version": 1, "size": 1},
                  {"name": "tiny-v0", "path": str(tiny_model_dir), "version": 0, "size": 1}]},
              "train": {"minibatches": 1, "epochs": 1, "global_batch": 4, "micro_batch": 2, "num_workers": 1,
                        "max_length": 128, "resources_per_worker": {"trainer_node": 1},
                        "storage_path": str(tmp_path / "ray-storage")}}
    r = _driver(env, address, DRIVER, json.dumps({"config": config, "pairs": str(pairs), "out": str(out)}))

    trainer = [nid for nid, res in r["nodes"].items() if res.get("trainer_node")]
    head = [nid for nid, res in r["nodes"].items() if res.get("head_node")]
    assert len(trainer) == 1 and len(head) == 1 and trainer != head
    (placement,) = r["placement"]
    assert placement["rank"] == 0 and placement["world_size"] == 1
    assert placement["node_id"] == trainer[0] != head[0]
    # the preflight before training probed the one node a worker could use; asked for 1 CPU, every node
    assert "[tso] storage check: 1 node(s) where Train workers can run see the inputs" in r["stdout"]
    assert sorted(r["probed_all"]) == sorted(r["nodes"])

    policy = Path(r["policy_dir"])
    assert (policy / "model.safetensors").is_file() and json.loads((policy / "lineage.json").read_text())["stage"] == 1
    # Ray Train's checkpoints went under storage_path (its own subdirectory), not <out>/ray
    assert not (out / "ray").exists()
    assert list((tmp_path / "ray-storage").glob("*/*/stage1_boundary_01"))


PROBE_ONLY_HERE = """
import json, sys
from pathlib import Path
from tso.cluster import connect_ray
from tso.train.ray_trainer import check_shared_storage

connect_ray()  # joins RAY_ADDRESS
inputs, out = json.loads(sys.argv[1]), Path(sys.argv[2])
try:
    check_shared_storage(inputs, {"training directory": out}, {"trainer_node": 1})
    error = None
except ValueError as e:
    error = str(e)
import ray
trainer = [n["NodeID"] for n in ray.nodes() if n["Alive"] and n["Resources"].get("trainer_node")]
print("RESULT " + json.dumps({"error": error, "trainer": trainer}))
"""


def test_storage_check_names_the_node_that_does_not_see_an_input(two_nodes, tmp_path):
    """``/proc/self/cwd/...`` is a path that resolves per process: the driver (started in a directory
    holding the file) sees it, the second node's worker (another working directory) does not, as a
    worker would miss a file on the driver's local disk."""
    address, env, _ = two_nodes
    here = tmp_path / "driver-only"
    here.mkdir()
    (here / "pairs.parquet").write_bytes(b"x" * 10)
    shared = write_pairs(arithmetic_pairs(4), tmp_path / "shared.parquet")
    inputs = {"pairs file": "/proc/self/cwd/pairs.parquet", "base model": str(shared)}
    r = _driver(env, address, PROBE_ONLY_HERE, json.dumps(inputs), str(tmp_path / "out"), cwd=here, timeout=150)
    err = r["error"]
    assert err is not None and err.startswith("Train workers would not see the files the driver sees")
    (trainer,) = r["trainer"]
    problems = [line.strip() for line in err.splitlines() if line.startswith("  node ")]
    # one line: the node (IP and id) and the input it misses; what every node shares passes
    assert len(problems) == 1 and problems[0].endswith(f"({trainer[:12]}): pairs file /proc/self/cwd/pairs.parquet: missing")
    assert "docs/cluster.md" in err.splitlines()[-1]  # and where the fix is described
    assert not list((tmp_path / "out").glob(".tso-storage-probe-*"))  # the probe files are cleaned up


def test_storage_problems_say_what_differs():
    from tso.train.ray_trainer import storage_problems

    paths = {"pairs file": "/data/p.parquet", "base model": "/data/m", "training directory": "/data/run/train"}
    expected = {"pairs file": ("file", 100), "base model": ("dir", (("config.json", 5),)), "training directory": "shared"}
    seen = {"pairs file": ("file", 90), "base model": "missing",
            "training directory": "the driver's probe file is not there (No such file or directory)"}
    assert storage_problems(paths, expected, seen) == [
        "pairs file /data/p.parquet: a different file (90 bytes, the driver sees 100)",
        "base model /data/m: missing",
        "training directory /data/run/train: the driver's probe file is not there (No such file or directory)"]
    assert storage_problems(paths, expected, dict(expected)) == []
    assert storage_problems(paths, expected, {**expected, "base model": ("dir", ())}) == [
        "base model /data/m: a different dir than the driver's"]


def test_one_node_cluster_is_not_probed(ray_cluster, tmp_path):
    from tso.train.ray_trainer import check_shared_storage

    assert check_shared_storage({"pairs file": str(tmp_path / "nowhere")}, {"training directory": tmp_path}, {"CPU": 1}) == []
    assert not list(tmp_path.iterdir())


def test_ray_storage_gives_each_training_directory_its_own_subdirectory(tmp_path):
    from tso.config import TrainConfig
    from tso.train.ray_trainer import ray_storage, worker_resources

    assert ray_storage(TrainConfig(), tmp_path / "stage-1" / "train") == str(tmp_path / "stage-1" / "train" / "ray")
    s3 = TrainConfig(storage_path="s3://bucket/tso/?region=us-west-2")
    a, b = ray_storage(s3, Path("/runs/a/stage-1/train")), ray_storage(s3, Path("/runs/b/stage-1/train"))
    assert a.startswith("s3://bucket/tso/stage-1-train-") and a.endswith("?region=us-west-2") and a != b
    assert ray_storage(s3, Path("/runs/a/stage-1/train")) == a  # a rerun finds its own
    assert worker_resources(TrainConfig(resources_per_worker={"trainer_node": 1})) == {"CPU": 1.0, "trainer_node": 1}
    assert worker_resources(TrainConfig(use_gpu=True)) == {"GPU": 1.0}
    with pytest.raises(ValueError, match="neither an absolute path nor a URI"):
        TrainConfig(storage_path="runs/ray")
    with pytest.raises(ValueError, match=">= 0"):
        TrainConfig(resources_per_worker={"trainer_node": -1})
