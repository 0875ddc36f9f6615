"""`ray job submit` of jobs/pipeline.py on a real local cluster with token authentication.

The cluster is `ray start --head --block` on free ports in a temporary directory, with
its own random token (RAY_AUTH_MODE=token), stopped at the end whatever happens."""
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import uuid

import pytest

from .conftest import REPO, TINY_OVERRIDES, WORKER_FITS

pytestmark = pytest.mark.slow


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def ray_cluster():
    tmp = tempfile.mkdtemp(prefix="wsss-cluster-", dir="/tmp")
    env = dict(os.environ, RAY_AUTH_MODE="token", RAY_AUTH_TOKEN=uuid.uuid4().hex,
               RAY_USAGE_STATS_ENABLED="0")
    env.pop("RAY_ADDRESS", None)
    dashboard = _free_port()
    ray_bin = os.path.join(os.path.dirname(sys.executable), "ray")
    cmd = [ray_bin, "start", "--head", "--block", f"--port={_free_port()}",
           f"--dashboard-port={dashboard}", "--dashboard-host=127.0.0.1",
           f"--dashboard-agent-listen-port={_free_port()}",
           f"--ray-client-server-port={_free_port()}", f"--temp-dir={tmp}", "--num-cpus=2",
           "--include-dashboard=true", "--disable-usage-stats"]
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                            start_new_session=True)
    address = f"http://127.0.0.1:{dashboard}"
    try:
        yield address, env
    finally:
        os.killpg(proc.pid, signal.SIGTERM)  # --block: ray stops this cluster's processes
        try:
            proc.wait(2)
        except subprocess.TimeoutExpired:
            # its graceful stop takes half a minute; nothing of this throwaway cluster
            # needs saving: kill the group, then anything still naming its temp dir
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(10)
        subprocess.run(["pkill", "-9", "-f", tmp], check=False)
        shutil.rmtree(tmp, ignore_errors=True)


def _client(address, env):
    """A JobSubmissionClient that presents the cluster's token, as a user of a remote
    cluster does. (Not through RAY_AUTH_TOKEN: Ray caches the token of the first cluster
    this process touched, the session's local Ray.)"""
    from ray.job_submission import JobSubmissionClient

    headers = {"Authorization": f"Bearer {env['RAY_AUTH_TOKEN']}"}
    deadline = time.time() + 90
    while True:
        try:
            return JobSubmissionClient(address, headers=headers)
        except Exception:  # noqa: BLE001 - the dashboard is still starting
            if time.time() > deadline:
                raise
            time.sleep(1)


def test_unauthenticated_requests_are_refused(ray_cluster):
    import requests

    address, env = ray_cluster
    _client(address, env)  # waits until the dashboard answers
    r = requests.get(f"{address}/api/jobs/", timeout=10)
    assert r.status_code in (401, 403)
    ok = requests.get(f"{address}/api/jobs/", timeout=10,
                      headers={"Authorization": f"Bearer {env['RAY_AUTH_TOKEN']}"})
    assert ok.status_code == 200


def test_pipeline_job_succeeds_and_writes_metrics(ray_cluster, copy_run, tiny_run):
    from ray.job_submission import JobStatus

    address, env = ray_cluster
    root = copy_run("job")
    manifest = json.load(open(os.path.join(root, "manifest.json")))
    # the job computes these again (the stages upstream stay done: skipped, so the job
    # costs little more than the cluster's start)
    for stage in ("evaluate", "report"):
        del manifest["stages"][stage]
    json.dump(manifest, open(os.path.join(root, "manifest.json"), "w"))
    os.remove(os.path.join(root, "metrics.json"))
    client = _client(address, env)
    entrypoint = " ".join([sys.executable, "jobs/pipeline.py", "--config", "configs/demo.yaml",
                           "--run-dir", root, *TINY_OVERRIDES, *WORKER_FITS])
    deadline = time.time() + 60
    while True:
        try:
            job = client.submit_job(entrypoint=entrypoint, runtime_env={
                "working_dir": REPO, "excludes": [".venv", ".git", "runs", "*.egg-info"]})
            break
        except RuntimeError:  # "No available agent to submit job" while it starts
            if time.time() > deadline:
                raise
            time.sleep(1)
    deadline = time.time() + 400
    status = client.get_job_status(job)
    while status not in (JobStatus.SUCCEEDED, JobStatus.FAILED, JobStatus.STOPPED):
        assert time.time() < deadline, "job did not finish in time"
        time.sleep(2)
        status = client.get_job_status(job)
    logs = client.get_job_logs(job)
    assert status == JobStatus.SUCCEEDED, logs[-4000:]
    assert "stage classifier: up to date, skipped" in logs
    assert "stage cams: up to date, skipped" in logs
    assert "stage evaluate: running" in logs and "CRF pseudo masks" in logs
    metrics = json.load(open(os.path.join(root, "metrics.json")))["evaluate"]
    reference = tiny_run.read_metrics()["evaluate"]
    assert metrics["crf"]["miou"] == pytest.approx(reference["crf"]["miou"], abs=1e-4)
    assert os.path.exists(os.path.join(root, "report", "index.html"))
