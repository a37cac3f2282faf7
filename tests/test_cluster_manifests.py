"""What runs on a cluster, checked without one: job entrypoints, the runtime env, Dockerfiles, KubeRay
manifests and the cluster-launcher YAML.

Docker and Kubernetes are not available here, so the files are parsed and checked for what would fail
on a cluster: an image that is not the official Ray image at a pinned version, a pin outside the
range pyproject.toml allows, an entrypoint or config path that does not exist in the image, a config
path that no volume mounts, a GPU worker group without GPUs, a dashboard on a public address, token
authentication off, and a working-dir upload that would carry environments, data or runs.
"""

from __future__ import annotations

import json
import re
import shlex
import subprocess
import sys
import tomllib
import zipfile
from importlib.metadata import version as installed_version
from pathlib import Path, PurePosixPath

import pytest
import yaml
from packaging.requirements import Requirement
from packaging.specifiers import SpecifierSet
from packaging.version import Version

REPO = Path(__file__).resolve().parents[1]
JOBS, DOCKER = REPO / "jobs", REPO / "docker"
PYPROJECT = tomllib.loads((REPO / "pyproject.toml").read_text())
PROJECT_VERSION = PYPROJECT["project"]["version"]
# Where the Dockerfiles put the repository in the image (their WORKDIR); manifests name paths below it.
IMAGE_REPO = PurePosixPath("/home/ray/raysemi")
RAY_VERSION = "2.60.0"
OFFICIAL_RAY_IMAGE = re.compile(rf"^rayproject/ray:{re.escape(RAY_VERSION)}-py(\d)(\d+)-(gpu|cpu)$")
KUBERAY_MANIFESTS = ["kuberay-rayjob.yaml", "kuberay-raycluster.yaml"]


def _requirements() -> dict[str, Requirement]:
    requirements = [Requirement(line) for line in PYPROJECT["project"]["dependencies"]]
    return {requirement.name.lower(): requirement for requirement in requirements}


def _constraints() -> dict[str, Version]:
    pins = {}
    for line in (DOCKER / "constraints.txt").read_text().splitlines():
        line = line.split("#", 1)[0].strip()
        if line:
            name, sep, pinned = line.partition("==")
            assert sep, f"docker/constraints.txt: {line!r} is not an exact pin NAME==VERSION"
            pins[name.strip().lower()] = Version(pinned.strip())
    return pins


def _in_repo(image_path: str) -> Path:
    """The repository file an in-image path (/home/ray/raysemi/...) or a repo-relative path names."""
    path = PurePosixPath(image_path)
    if path.is_absolute():
        assert path.is_relative_to(IMAGE_REPO), f"{image_path} is outside the image's copy of the repo ({IMAGE_REPO})"
        path = path.relative_to(IMAGE_REPO)
    return REPO / path


# -- job entrypoints --------------------------------------------------------------------------------

CLI_ENTRYPOINTS = [("run_pipeline.py", "run"), ("tune_sweep.py", "tune"), ("predict.py", "predict")]
BENCHMARK_ENTRYPOINTS = ["data_efficiency.py", "domain_shift.py"]


def _run_python(args: list[str], cwd: Path = REPO) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, *args], cwd=cwd, capture_output=True, text=True, timeout=120)


@pytest.mark.parametrize(("script", "subcommand"), CLI_ENTRYPOINTS)
def test_cli_entrypoint_forwards_to_its_subcommand(script, subcommand):
    result = _run_python([f"jobs/{script}", "--help"])
    if f"invalid choice: '{subcommand}'" in result.stderr:
        pytest.skip(f"`raysemi {subcommand}` is not registered in raysemi/cli.py yet")
    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith(f"usage: raysemi {subcommand} ")
    assert "--config" in result.stdout and "--set" in result.stdout


def test_pipeline_entrypoint_applies_the_config_file_and_set_overrides(tmp_path):
    # tau_high 0.6 from the file and tau_low 0.55 from --set are both needed to produce this exact
    # error, so it shows that both reached the config (the run stops before any Ray work).
    config = tmp_path / "bad.yaml"
    config.write_text("loss:\n  tau_high: 0.6\n")
    result = _run_python(["jobs/run_pipeline.py", "--config", str(config), "--set", "loss.tau_low=0.55"])
    assert result.returncode == 2
    assert "tau_high (0.6) must be below tau_low (0.55)" in result.stderr


@pytest.mark.parametrize("script", BENCHMARK_ENTRYPOINTS)
def test_benchmark_entrypoint_runs_the_benchmark_as_a_script(script, tmp_path):
    # A stand-in benchmark in a copy of the layout: it imports a sibling helper the way the real
    # benchmarks do (`from _common import ...`) and prints what it was given.
    (tmp_path / "jobs").mkdir()
    (tmp_path / "benchmarks").mkdir()
    (tmp_path / "jobs" / script).write_text((JOBS / script).read_text())
    (tmp_path / "benchmarks" / "_common.py").write_text("GREETING = 'helper imported'\n")
    (tmp_path / "benchmarks" / script).write_text(
        "import json, sys\nfrom _common import GREETING\n"
        "if __name__ == '__main__':\n    print(json.dumps({'argv': sys.argv, 'greeting': GREETING}))\n"
    )
    args = ["--config", "jobs/configs/brats2021.yaml", "--set", "data.seed=3", "--out", "x.json"]
    result = _run_python([f"jobs/{script}", *args], cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    seen = json.loads(result.stdout)
    assert seen == {"argv": [str(tmp_path / "benchmarks" / script), *args], "greeting": "helper imported"}


@pytest.mark.parametrize("script", BENCHMARK_ENTRYPOINTS)
def test_benchmark_entrypoint_reaches_the_real_benchmark(script):
    if not (REPO / "benchmarks" / script).is_file():
        pytest.skip(f"benchmarks/{script} is not written yet")
    result = _run_python([f"jobs/{script}", "--help"])
    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith(f"usage: {script} ")
    assert "--config" in result.stdout and "--set" in result.stdout


@pytest.mark.parametrize("script", BENCHMARK_ENTRYPOINTS)
def test_benchmark_entrypoint_without_its_benchmark_says_which_file_is_missing(script, tmp_path):
    (tmp_path / "jobs").mkdir()
    (tmp_path / "jobs" / script).write_text((JOBS / script).read_text())
    result = _run_python([f"jobs/{script}"], cwd=tmp_path)
    assert result.returncode == 1
    assert f"{tmp_path / 'benchmarks' / script}: benchmark script not found" in result.stderr


@pytest.mark.parametrize("script", [name for name, _ in CLI_ENTRYPOINTS] + BENCHMARK_ENTRYPOINTS)
def test_entrypoint_docstring_shows_its_submit_command(script):
    import ast

    docstring = ast.get_docstring(ast.parse((JOBS / script).read_text()))
    command = " ".join(docstring.replace("\\\n", " ").split())
    assert "ray job submit --address http://127.0.0.1:8265 --working-dir . --runtime-env jobs/runtime_env.yaml" in command
    assert f"-- python jobs/{script} --config jobs/configs/" in command


# -- runtime env ------------------------------------------------------------------------------------


def _runtime_env() -> dict:
    return yaml.safe_load((JOBS / "runtime_env.yaml").read_text())


def test_runtime_env_is_valid_for_ray_and_leaves_working_dir_to_the_command_line():
    from ray.runtime_env import RuntimeEnv

    raw = _runtime_env()
    RuntimeEnv(**raw)  # Ray's own validation of field names and types
    assert "working_dir" not in raw  # `--working-dir .` on the command line
    assert all(isinstance(value, str) for value in raw["env_vars"].values())


def _package(root: Path, target: Path, excludes: list[str]) -> set[str]:
    """The file names Ray would upload for ``--working-dir root`` (Ray's own packaging code), ignoring
    .gitignore so that the excludes alone are tested."""
    from ray._private.runtime_env.packaging import create_package

    create_package(str(root), target, include_gitignore=False, excludes=excludes)
    with zipfile.ZipFile(target) as archive:
        return {name for name in archive.namelist() if not name.endswith("/")}


def test_runtime_env_excludes_environments_data_runs_and_mlflow_stores(tmp_path):
    tree = tmp_path / "checkout"
    kept = ["raysemi/__init__.py", "jobs/run_pipeline.py", "jobs/configs/demo.yaml", "benchmarks/data_efficiency.py"]
    dropped = [
        ".venv/lib/python3.11/site-packages/torch/__init__.py", ".git/HEAD", "runs/demo/teacher/model.pt",
        "demo_data/SYNTH_A_00000/SYNTH_A_00000_t1.nii.gz", "mlflow.db", "mlruns/0/meta.yaml",
        "mlartifacts/1/model.pt", "raysemi/__pycache__/cli.cpython-311.pyc", "benchmarks/out/report.json",
        "raysemi.egg-info/PKG-INFO", "scratch/case_seg.nii",
    ]
    for name in kept + dropped:
        (tree / name).parent.mkdir(parents=True, exist_ok=True)
        (tree / name).write_text("x")
    assert _package(tree, tmp_path / "package.zip", _runtime_env()["excludes"]) == set(kept)


def test_repository_upload_stays_small(tmp_path):
    names = _package(REPO, tmp_path / "repo.zip", _runtime_env()["excludes"])
    size_mb = (tmp_path / "repo.zip").stat().st_size / 1e6
    assert size_mb < 5, f"--working-dir . would upload {size_mb:.1f} MB"
    assert {"jobs/run_pipeline.py", "jobs/configs/demo.yaml", "raysemi/cli.py"} <= names
    assert not [name for name in names if name.split("/")[0] in {".venv", ".git", "runs", "demo_data", "mlruns"}]


# -- Dockerfiles ------------------------------------------------------------------------------------

DOCKERFILES = ["Dockerfile.gpu", "Dockerfile.cpu"]


def _instructions(dockerfile: Path) -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) pairs, with continuation lines joined and comments dropped."""
    text = re.sub(r"\\\n", " ", dockerfile.read_text())
    lines = [line.strip() for line in text.splitlines()]
    return [(line.split(None, 1)[0].upper(), line.split(None, 1)[1]) for line in lines if line and not line.startswith("#")]


@pytest.mark.parametrize("name", DOCKERFILES)
def test_dockerfile_builds_on_the_official_ray_image_at_the_installed_ray_version(name):
    import ray

    froms = [args for instruction, args in _instructions(DOCKER / name) if instruction == "FROM"]
    assert len(froms) == 1
    match = OFFICIAL_RAY_IMAGE.match(froms[0])
    assert match, f"{name}: FROM {froms[0]!r} is not rayproject/ray:{RAY_VERSION}-pyXY-(gpu|cpu)"
    assert match.group(3) == name.rsplit(".", 1)[1]
    assert ray.__version__ == RAY_VERSION
    assert _requirements()["ray"].specifier.contains(RAY_VERSION)
    assert Version(f"{match.group(1)}.{match.group(2)}") in SpecifierSet(PYPROJECT["project"]["requires-python"])


@pytest.mark.parametrize("name", DOCKERFILES)
def test_dockerfile_copies_files_that_exist_and_installs_with_the_pins(name):
    instructions = _instructions(DOCKER / name)
    workdirs = [args for instruction, args in instructions if instruction == "WORKDIR"]
    assert workdirs == [str(IMAGE_REPO)]
    for instruction, args in instructions:
        if instruction == "COPY":
            sources = [part for part in args.split() if not part.startswith("--")][:-1]
            for source in sources:
                assert (REPO / source).exists(), f"{name}: COPY {source}: no such file in the repository"
        if instruction == "RUN" and "pip install" in args:
            assert "-c docker/constraints.txt" in args, f"{name}: pip install without the pins: {args}"
    runs = " ".join(args for instruction, args in instructions if instruction == "RUN")
    cpu_index = "--index-url https://download.pytorch.org/whl/cpu"
    assert (cpu_index in runs) == name.endswith(".cpu"), "only the CPU image takes torch from the CPU wheel index"


def test_pins_lie_in_pyproject_ranges_and_match_the_tested_environment():
    pins, requirements = _constraints(), _requirements()
    assert set(requirements) <= set(pins), f"dependencies without a pin: {sorted(set(requirements) - set(pins))}"
    for name, pinned in pins.items():
        assert name in requirements, f"docker/constraints.txt pins {name}, which pyproject.toml does not require"
        assert requirements[name].specifier.contains(pinned), f"{name}=={pinned} is outside {requirements[name]}"
        # The images run what the tests ran (a local build label such as +cpu does not count).
        assert Version(installed_version(name)).public == pinned.public, f"{name}: .venv has {installed_version(name)}"


# -- KubeRay ----------------------------------------------------------------------------------------


def _documents(name: str) -> list[dict]:
    return [doc for doc in yaml.safe_load_all((DOCKER / name).read_text()) if doc]


def _cluster_spec(doc: dict) -> dict:
    return doc["spec"]["rayClusterSpec"] if doc["kind"] == "RayJob" else doc["spec"]


def _pods(spec: dict) -> list[tuple[str, dict]]:
    groups = [("head", spec["headGroupSpec"])] + [(group["groupName"], group) for group in spec["workerGroupSpecs"]]
    return [(name, group["template"]["spec"]) for name, group in groups]


def test_kuberay_manifests_are_ray_io_v1_with_token_auth_and_a_private_dashboard():
    kinds = []
    for name in KUBERAY_MANIFESTS:
        for doc in _documents(name):
            assert doc["apiVersion"] == "ray.io/v1", name
            kinds.append(doc["kind"])
            spec = _cluster_spec(doc)
            assert spec["rayVersion"] == RAY_VERSION
            assert spec["authOptions"]["mode"] == "token"
            assert spec["headGroupSpec"]["serviceType"] == "ClusterIP"
            assert not spec["headGroupSpec"].get("enableIngress", False)
    assert sorted(kinds) == ["RayCluster", "RayJob"]


def test_kuberay_images_are_the_pinned_raysemi_image_and_gpu_workers_request_gpus():
    dockerfile_from = next(args for instruction, args in _instructions(DOCKER / "Dockerfile.gpu") if instruction == "FROM")
    assert OFFICIAL_RAY_IMAGE.match(dockerfile_from)
    for name in KUBERAY_MANIFESTS:
        for doc in _documents(name):
            for group, pod in _pods(_cluster_spec(doc)):
                for container in pod["containers"]:
                    # docker/Dockerfile.gpu's tag: the project version, never "latest"
                    assert container["image"].rsplit("/", 1)[-1] == f"raysemi:{PROJECT_VERSION}-gpu", (name, group)
                    if group != "head":
                        for kind in ("limits", "requests"):
                            assert int(container["resources"][kind]["nvidia.com/gpu"]) >= 1, (name, group, kind)


def _mounts(pod: dict) -> dict[PurePosixPath, bool]:
    """mount path -> writable, for the volumes of the pod's first container (checked to be defined)."""
    volumes = {volume["name"] for volume in pod["volumes"]}
    mounts = {}
    for mount in pod["containers"][0]["volumeMounts"]:
        assert mount["name"] in volumes, f"volumeMount {mount['name']} has no volume"
        mounts[PurePosixPath(mount["mountPath"])] = not mount.get("readOnly", False)
    return mounts


def _under(path: str, mounts: dict[PurePosixPath, bool], writable: bool) -> bool:
    return any(PurePosixPath(path).is_relative_to(m) and (w or not writable) for m, w in mounts.items())


def test_rayjob_entrypoint_config_and_storage_exist_where_the_pods_look():
    from raysemi.config import load_config

    (rayjob,) = _documents("kuberay-rayjob.yaml")
    words = shlex.split(rayjob["spec"]["entrypoint"])
    assert words[0] == "python"
    script = _in_repo(words[1])
    assert script.parent == JOBS and script.is_file(), words[1]
    config_path = _in_repo(words[words.index("--config") + 1])
    assert config_path.is_file(), config_path
    overrides = [words[i + 1] for i, word in enumerate(words) if word == "--set"]
    cfg = load_config(config_path, overrides)  # the overrides are valid config keys and values
    for group, pod in _pods(rayjob["spec"]["rayClusterSpec"]):
        mounts = _mounts(pod)
        assert _under(cfg.data.root, mounts, writable=False), (group, cfg.data.root)
        assert _under(cfg.train.storage_path, mounts, writable=True), (group, cfg.train.storage_path)


# -- Ray cluster launcher ---------------------------------------------------------------------------


def test_cluster_launcher_config_is_valid_for_ray_up():
    import jsonschema
    import ray.autoscaler

    schema = json.loads((Path(ray.autoscaler.__file__).parent / "ray-schema.json").read_text())
    jsonschema.validate(yaml.safe_load((DOCKER / "cluster-aws.yaml").read_text()), schema)


def test_cluster_launcher_is_secure_pinned_and_has_gpu_workers():
    config = yaml.safe_load((DOCKER / "cluster-aws.yaml").read_text())
    assert OFFICIAL_RAY_IMAGE.match(config["docker"]["image"]).group(3) == "gpu"
    head = " ".join(config["head_start_ray_commands"])
    workers = " ".join(config["worker_start_ray_commands"])
    assert "--dashboard-host=127.0.0.1" in head and "0.0.0.0" not in head
    assert "RAY_AUTH_MODE=token ray start --head" in head
    assert "RAY_AUTH_MODE=token ray start --address" in workers
    # The token every node starts with is the one `ray get-auth-token --generate` wrote on the laptop.
    assert config["file_mounts"]["/home/ray/.ray/auth_token"] == "~/.ray/auth_token"
    # The repository is copied from the directory `ray up` runs in (the repository root).
    assert config["file_mounts"][str(IMAGE_REPO)] == "."
    for command in config["setup_commands"]:
        for path in re.findall(rf"{IMAGE_REPO}/\S+", command):
            assert _in_repo(path).exists(), path
    node_types = config["available_node_types"]
    gpu_types = [name for name, node in node_types.items() if node.get("resources", {}).get("GPU", 0) >= 1]
    assert gpu_types and config["head_node_type"] not in gpu_types


def test_cluster_launcher_mounts_the_paths_of_the_brats_config():
    from raysemi.config import load_config

    config = yaml.safe_load((DOCKER / "cluster-aws.yaml").read_text())
    mounts = {}
    for option in config["docker"]["run_options"]:
        if option.startswith("-v "):
            _, target, *mode = option.split()[1].split(":")
            mounts[PurePosixPath(target)] = mode != ["ro"]
    cfg = load_config(JOBS / "configs" / "brats2021.yaml")
    assert _under(cfg.data.root, mounts, writable=False)
    assert _under(cfg.train.storage_path, mounts, writable=True)
