"""A real ``ray job submit`` of the pipeline to a local Ray head with token authentication.

This is what the README's "Run on a cluster" section tells users to do, on one machine:

- ``ray get-auth-token --generate`` writes the token to ``$HOME/.ray/auth_token`` (HOME is a temporary
  folder here, so the user's own token is never read or written);
- ``ray start --head`` with ``RAY_AUTH_MODE=token``, dashboard and job server on 127.0.0.1, every port
  chosen free and its own ``--temp-dir``, so that it shares nothing with the session's ``ray_cluster``
  fixture (RAY_ADDRESS is never set in this process);
- ``ray job submit --working-dir . --runtime-env jobs/runtime_env.yaml -- python jobs/run_pipeline.py``
  from the repository root, with a tiny config, and the MLflow store checked for the parent run and its
  teacher and stage child runs;
- a submission without the token, or with a wrong one, is refused.

The head's processes are found by its temporary folder (which every one of them names on its command
line, or descends from one that does) and ended in a ``finally``: never ``ray stop``, which ends every Ray
process of the user on the machine.
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
import uuid
from dataclasses import dataclass
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
VENV_BIN = Path(sys.executable).parent
RAY = str(VENV_BIN / "ray")

# Minutes, not seconds: `pytest -m "not slow"` leaves it out (it runs in the default `pytest`).
pytestmark = pytest.mark.slow

JOB_TIMEOUT_S = 12 * 60
# Variables of the caller that would point the head or the client somewhere else.
_FOREIGN_ENV = (
    "RAY_ADDRESS", "RAY_API_SERVER_ADDRESS", "RAY_AUTH_TOKEN", "RAY_AUTH_TOKEN_PATH", "RAY_JOB_HEADERS",
    "MLFLOW_TRACKING_URI",
)


@dataclass
class SecureHead:
    address: str  # job server (dashboard) URL
    dashboard_port: int
    token: str
    head_env: dict[str, str]  # RAY_AUTH_MODE=token, HOME holding the token

    def client_env(self, home: Path, token: str | None = None) -> dict[str, str]:
        """A client with a HOME of its own: token mode and RAY_AUTH_TOKEN when ``token`` is given, else a
        plain client that sends no token at all."""
        env = {**self.head_env, "HOME": str(home)}
        if token is None:
            del env["RAY_AUTH_MODE"]
        else:
            env["RAY_AUTH_TOKEN"] = token
        return env


def _free_ports(count: int) -> list[int]:
    """``count`` distinct ports that are free on 127.0.0.1 right now."""
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


def _process_table() -> dict[int, tuple[int, str]]:
    """pid -> (parent pid, command line) of every process visible in /proc."""
    table = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            cmdline = (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
            stat = (entry / "stat").read_text()
        except OSError:
            continue
        # The command name in /proc/<pid>/stat may contain spaces and parentheses; fields follow the last ')'.
        fields = stat.rsplit(")", 1)[1].split()
        if fields[0] != "Z":  # zombies are already gone, only not yet reaped
            table[int(entry.name)] = (int(fields[1]), cmdline)
    return table


def _head_processes(marker: str) -> set[int]:
    """Processes whose command line names ``marker`` (the head's temp dir), and all their descendants
    (Ray workers rename themselves ``ray::IDLE`` and name no folder)."""
    table = _process_table()
    found = {pid for pid, (_, cmdline) in table.items() if marker in cmdline and pid != os.getpid()}
    while True:
        children = {pid for pid, (parent, _) in table.items() if parent in found} - found
        if not children:
            return found
        found |= children


def _stop_head(marker: str, grace_s: float = 8.0) -> set[int]:
    """SIGTERM the head's processes, SIGKILL what is left after ``grace_s``; returns the pids still alive."""
    pids = _head_processes(marker)
    for sig in (signal.SIGTERM, signal.SIGKILL):
        for pid in pids:
            try:
                os.kill(pid, sig)
            except ProcessLookupError:
                pass
        deadline = time.monotonic() + grace_s
        while time.monotonic() < deadline:
            pids &= set(_process_table())
            if not pids:
                return set()
            time.sleep(0.5)
    return pids & set(_process_table())


def _run(cmd: list[str], env: dict[str, str], timeout: float = 180, cwd: Path = REPO) -> subprocess.CompletedProcess:
    return subprocess.run(cmd, env=env, cwd=cwd, capture_output=True, text=True, timeout=timeout)


@pytest.fixture(scope="module")
def secure_head():
    """A local Ray head with token authentication, on 127.0.0.1 and free ports, stopped afterwards."""
    # Short path: Ray puts Unix sockets under it, and socket paths are limited to 107 characters.
    temp_dir = tempfile.mkdtemp(prefix="raysemi-head-")
    home = Path(temp_dir) / "home"
    home.mkdir()
    env = {key: value for key, value in os.environ.items() if key not in _FOREIGN_ENV}
    env.update(
        HOME=str(home),
        RAY_AUTH_MODE="token",
        # `python` in job entrypoints and Ray's workers: this interpreter, where raysemi is installed.
        PATH=f"{VENV_BIN}{os.pathsep}{env.get('PATH', '')}",
        RAY_USAGE_STATS_ENABLED="0",
    )
    try:
        generated = _run([RAY, "get-auth-token", "--generate"], env)
        assert generated.returncode == 0, generated.stderr
        token_file = home / ".ray" / "auth_token"
        token = token_file.read_text().strip()
        assert generated.stdout.strip() == token, "ray get-auth-token prints the token it stored in ~/.ray/auth_token"

        (gcs, dashboard, client, agent_http, agent_grpc, metrics, runtime_env_agent, node_manager, object_manager) = _free_ports(9)
        start = [
            RAY, "start", "--head", "--node-ip-address=127.0.0.1", "--dashboard-host=127.0.0.1",
            f"--port={gcs}", f"--dashboard-port={dashboard}", f"--ray-client-server-port={client}",
            f"--dashboard-agent-listen-port={agent_http}", f"--dashboard-agent-grpc-port={agent_grpc}",
            f"--metrics-export-port={metrics}", f"--runtime-env-agent-port={runtime_env_agent}",
            f"--node-manager-port={node_manager}", f"--object-manager-port={object_manager}",
            "--num-cpus=4", f"--object-store-memory={512 * 1024**2}", f"--temp-dir={temp_dir}",
            "--include-dashboard=true", "--disable-usage-stats",
        ]
        started = _run(start, env, timeout=240)
        assert started.returncode == 0, f"ray start failed:\n{started.stdout}\n{started.stderr}"
        yield SecureHead(f"http://127.0.0.1:{dashboard}", dashboard, token, env)
    finally:
        left = _stop_head(temp_dir)
        shutil.rmtree(temp_dir, ignore_errors=True)
        assert not left, f"processes of the test head still alive: {sorted(left)}"


def _auth_client(head: SecureHead):
    """A job client that passes the token as an explicit ``Authorization`` header (what
    ``ray job submit --headers`` does), so this test process needs no RAY_AUTH_MODE of its own."""
    from ray.job_submission import JobSubmissionClient

    return JobSubmissionClient(head.address, headers={"Authorization": f"Bearer {head.token}"})


def _non_loopback_ipv4() -> str | None:
    """An IPv4 address of this machine other than 127.x (None if it has none)."""
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as probe:
        try:
            probe.connect(("192.0.2.1", 9))  # UDP: picks the outgoing interface, sends nothing
            address = probe.getsockname()[0]
        except OSError:
            address = None
    if address and not address.startswith("127."):
        return address
    try:
        address = socket.gethostbyname(socket.gethostname())
    except OSError:
        return None
    return None if address.startswith("127.") else address


def test_job_server_listens_on_loopback_only(secure_head):
    with socket.create_connection(("127.0.0.1", secure_head.dashboard_port), timeout=5):
        pass
    address = _non_loopback_ipv4()
    if address is None:
        pytest.skip("this machine has no non-loopback IPv4 address to try")
    with pytest.raises(OSError):
        socket.create_connection((address, secure_head.dashboard_port), timeout=5).close()


def test_submission_without_the_right_token_is_refused(secure_head, tmp_path):
    empty_home = tmp_path / "home-without-token"
    empty_home.mkdir()
    marker = f"refused-{uuid.uuid4().hex[:8]}"
    submit = [RAY, "job", "submit", "--address", secure_head.address, "--", "python", "-c", f"print('{marker}')"]

    no_token = _run(submit, secure_head.client_env(empty_home))
    assert no_token.returncode != 0
    assert "Unauthorized: Missing authentication token" in no_token.stdout + no_token.stderr

    wrong_token = _run(submit, secure_head.client_env(empty_home, token="0" * 32))
    assert wrong_token.returncode != 0
    assert "Forbidden: Invalid authentication token" in wrong_token.stdout + wrong_token.stderr

    # The job server itself answers 401 without a token and serves the same request with it.
    request = urllib.request.Request(f"{secure_head.address}/api/jobs/")
    with pytest.raises(urllib.error.HTTPError) as refused:
        urllib.request.urlopen(request, timeout=30)
    assert refused.value.code == 401
    request.add_header("Authorization", f"Bearer {secure_head.token}")
    with urllib.request.urlopen(request, timeout=30) as response:
        assert response.status == 200

    # Neither attempt created a job.
    jobs = _auth_client(secure_head).list_jobs()
    assert not [job for job in jobs if marker in job.entrypoint]


def test_pipeline_job_succeeds_and_logs_to_mlflow(secure_head, tmp_path):
    from mlflow.tracking import MlflowClient
    from ray.job_submission import JobStatus

    from raysemi.data.synth import synth_dataset

    data_root = tmp_path / "cases"
    # Two sites, as jobs/configs/demo.yaml expects (labels from site A; unlabeled and validation scans
    # from site B). 4 mm voxels: the 32^3 grid holds the whole brain (field of view = shape x spacing).
    synth_dataset(data_root, None, (32, 32, 32), spacing=(4.0, 4.0, 4.0), seed=3, sites={"A": 3, "B": 5})
    storage = tmp_path / "runs"
    mlflow_db = tmp_path / "mlflow.db"
    overrides = [
        f"data.root={data_root}", "data.patch_size=[32,32,32]", "train.epochs=1", "curriculum.stages=1",
        "curriculum.epochs_per_stage=1", f"train.storage_path={storage}", f"tracking.uri=sqlite:///{mlflow_db}",
        "model.mc_passes=2", "train.run_name=job-submit-test",
    ]
    submission_id = f"raysemi-test-{uuid.uuid4().hex[:8]}"
    # The README's command, run from the repository root; the token comes from $HOME/.ray/auth_token.
    submit = [
        RAY, "job", "submit", "--address", secure_head.address, "--submission-id", submission_id, "--no-wait",
        "--working-dir", ".", "--runtime-env", "jobs/runtime_env.yaml",
        "--", "python", "jobs/run_pipeline.py", "--config", "jobs/configs/demo.yaml",
        *[arg for override in overrides for arg in ("--set", override)],
    ]
    submitted = _run(submit, secure_head.head_env)
    assert submitted.returncode == 0, f"ray job submit failed:\n{submitted.stdout}\n{submitted.stderr}"

    client = _auth_client(secure_head)
    deadline = time.monotonic() + JOB_TIMEOUT_S
    status = client.get_job_status(submission_id)
    while not status.is_terminal() and time.monotonic() < deadline:
        time.sleep(5)
        status = client.get_job_status(submission_id)
    logs = client.get_job_logs(submission_id)
    if not status.is_terminal():
        client.stop_job(submission_id)
    assert status == JobStatus.SUCCEEDED, f"job {submission_id} ended {status}; its logs:\n{logs[-20000:]}"

    assert (storage / "job-submit-test" / "results" / "final_metrics.json").is_file(), logs[-5000:]
    mlflow = MlflowClient(tracking_uri=f"sqlite:///{mlflow_db}")
    experiment = mlflow.get_experiment_by_name("raysemi-demo")  # jobs/configs/demo.yaml
    assert experiment is not None
    runs = mlflow.search_runs([experiment.experiment_id])
    by_role: dict[str, list] = {}
    for run in runs:
        by_role.setdefault(run.data.tags.get("raysemi.role"), []).append(run)
    assert len(by_role.get("pipeline", [])) == 1, {role: len(items) for role, items in by_role.items()}
    parent = by_role["pipeline"][0]
    assert parent.info.status == "FINISHED"
    assert len(by_role.get("teacher", [])) == 1
    students = by_role.get("student", [])
    assert [run.data.tags["raysemi.stage"] for run in students] == ["1"]
    for child in [*by_role["teacher"], *students]:
        assert child.data.tags.get("mlflow.parentRunId") == parent.info.run_id
