"""The docker files, checked without a docker engine: commands exist, settings are documented, ports and volumes
line up."""

import ast
import re
import subprocess
import sys
from urllib.parse import urlsplit

import yaml

from ale_backend.settings import environment_variables
from tests.conftest import ROOT

COMPOSE = yaml.safe_load((ROOT / "docker" / "docker-compose.yml").read_text())
GPU = yaml.safe_load((ROOT / "docker" / "docker-compose.gpu.yml").read_text())
BACKEND_ONLY = yaml.safe_load((ROOT / "docker" / "docker-compose.backend.yml").read_text())
HOSTS = yaml.safe_load((ROOT / "docker" / "docker-compose.hosts.yml").read_text())
DOCKERFILE = (ROOT / "docker" / "Dockerfile").read_text()
CONFIGURATION = (ROOT / "docs" / "configuration.md").read_text()


def instructions(name):
    return [line.split(None, 1)[1] for line in DOCKERFILE.splitlines() if line.startswith(name + " ")]


def test_every_service_command_exists_in_the_project():
    backend, worker = COMPOSE["services"]["backend"], COMPOSE["services"]["worker"]
    assert backend["command"] == ["gunicorn", "_wsgi:app"]
    tree = ast.parse((ROOT / "_wsgi.py").read_text())
    module_level = [n for top in tree.body if not isinstance(top, (ast.FunctionDef, ast.ClassDef))
                    for n in ast.walk(top)]
    assert any(isinstance(n, ast.Assign) and any(getattr(t, "id", None) == "app" for t in n.targets)
               for n in module_level)
    assert (ROOT / "gunicorn.conf.py").is_file()
    assert worker["command"][:3] == ["python", "-m", "ale_backend"]
    shown = subprocess.run([sys.executable, "-m", "ale_backend", *worker["command"][3:], "--help"], cwd=ROOT,
                           capture_output=True, text=True, timeout=60)
    assert shown.returncode == 0, shown.stderr
    assert worker["image"] == backend["image"]  # the worker runs the image the backend builds


def test_the_dockerfile_copies_what_exists_and_runs_as_a_user():
    for copy in instructions("COPY"):
        *sources, _ = copy.split()
        for source in sources:
            assert (ROOT / source).exists(), source
    assert instructions("USER") and instructions("USER")[-1] not in {"root", "0"}
    assert "HEALTHCHECK" in DOCKERFILE and "/health" in DOCKERFILE
    assert instructions("CMD") == ['["gunicorn", "_wsgi:app"]']
    assert any("requirements.txt -c constraints.txt" in run for run in instructions("RUN"))


def test_ports_and_volumes_line_up():
    services = COMPOSE["services"]
    backend_env = services["backend"]["environment"]
    assert services["worker"]["environment"] == backend_env
    port = backend_env["PORT"]
    assert instructions("EXPOSE") == [port]
    assert f"{port}:{port}" in services["backend"]["ports"]
    models = [v for v in services["backend"]["volumes"] if v.endswith(":" + backend_env["MODEL_DIR"])]
    assert models and models == [v for v in services["worker"]["volumes"] if v.startswith(models[0].split(":")[0])]
    assert models[0].split(":")[0] in COMPOSE["volumes"]
    label_studio = urlsplit(backend_env["LABEL_STUDIO_URL"])
    assert label_studio.hostname == "label-studio"
    assert f"{label_studio.port}:{label_studio.port}" in services["label-studio"]["ports"]
    assert urlsplit(backend_env["REDIS_URL"]).hostname == "redis"
    assert "--appendonly" in services["redis"]["command"] and services["redis"]["volumes"][0].endswith(":/data")
    assert services["label-studio"]["image"].endswith(":1.23.2")
    assert services["label-studio"]["environment"]["ML_BLOCK_LOCAL_IP"] == "false"
    assert set(GPU["services"]) == {"backend", "worker"}


def test_every_variable_the_code_reads_is_documented():
    read = set(environment_variables())
    for path in [*ROOT.glob("ale_backend/*.py"), ROOT / "gunicorn.conf.py", ROOT / "_wsgi.py"]:
        read |= set(re.findall(r"os\.environ(?:\.get|\.setdefault)?\(\s*[\"']([A-Z0-9_]+)[\"']", path.read_text()))
        read |= set(re.findall(r"os\.environ\[[\"']([A-Z0-9_]+)[\"']\]", path.read_text()))
    internal = {"YOLO_OFFLINE", "YOLO_AUTOINSTALL", "YOLO_VERBOSE", "YOLO_CONFIG_DIR", "MPLCONFIGDIR",
                "PROMETHEUS_MULTIPROC_DIR", "REDIS_ORIGIN"}  # set by the backend itself (for its libraries, make run)
    documented = set(re.findall(r"`([A-Z0-9_]+)`", CONFIGURATION))
    missing = sorted(v for v in read - internal if v not in documented)
    assert not missing, f"not in docs/configuration.md: {missing}"
    example = (ROOT / "docker" / ".env.example").read_text()
    assert not [v for v in environment_variables() if f"{v}=" not in example]
    assert {"PORT", "WORKERS", "THREADS"} <= read


def test_the_backend_only_stack_runs_the_same_backend_for_a_label_studio_elsewhere():
    services = BACKEND_ONLY["services"]
    assert set(services) == {"redis", "backend", "worker"}
    full = COMPOSE["services"]
    for name in ("backend", "worker"):
        assert services[name]["command"] == full[name]["command"] and services[name]["env_file"] == ".env"
        assert services[name]["volumes"] == full[name]["volumes"]
        assert "host.docker.internal:host-gateway" in services[name]["extra_hosts"]
    env = services["backend"]["environment"]
    assert services["worker"]["environment"] == env
    assert not {"LABEL_STUDIO_URL", "LABEL_STUDIO_API_KEY"} & set(env)  # the user's, from .env
    assert {k: v for k, v in full["backend"]["environment"].items() if not k.startswith("LABEL_STUDIO_")} == env
    assert services["backend"]["ports"] == full["backend"]["ports"] and "label-studio" not in str(services)
    assert set(GPU["services"]) <= set(services)  # the GPU override applies to it as well


def test_the_configuration_table_gives_the_settings_defaults():
    rows = dict(re.findall(r"^\| `([A-Z0-9_]+)` \| ([^|]+) \|", CONFIGURATION, re.MULTILINE))
    for variable, default in environment_variables().items():
        if variable not in rows:  # rows of several variables (BASIC_AUTH_USER, BASIC_AUTH_PASS) give none
            continue
        shown = rows[variable].strip()
        empty = shown.startswith("*(") and shown.endswith(")*")  # *(none)*, *(auto)*, *(DEVICE)*: what unset means
        assert shown == f"`{default}`" or (not default and empty), (variable, shown)
    assert len(rows) >= len(environment_variables()) - 2


def test_the_image_can_carry_the_pretrained_weights_the_stacks_share():
    assert "ARG PRETRAINED=yolov5nu.pt" in DOCKERFILE  # the default base model, fetched at build time
    fetch = r'^RUN if \[ -n "\$PRETRAINED" \]; then \\\n\s+MODEL_PATH="\$PRETRAINED" .*-m ale_backend fetch-model'
    assert re.search(fetch, DOCKERFILE, re.MULTILINE)
    shown = subprocess.run([sys.executable, "-m", "ale_backend", "fetch-model", "--help"], cwd=ROOT,
                           capture_output=True, text=True, timeout=60)
    assert shown.returncode == 0, shown.stderr
    weights_dir = re.search(r"WEIGHTS_DIR=(\S+)", DOCKERFILE).group(1)
    for stack in (COMPOSE, BACKEND_ONLY):
        for name in ("backend", "worker"):
            mounts = [v for v in stack["services"][name]["volumes"] if v.split(":")[1] == weights_dir]
            assert mounts and mounts[0].split(":")[0] in stack["volumes"], (name, mounts)


def test_the_several_hosts_stack_shares_only_redis_and_the_bucket():
    services = HOSTS["services"]
    assert set(services) == {"redis", "s3", "bucket", "backend", "trainer", "scorer"}
    roles = {name: services[name] for name in ("backend", "trainer", "scorer")}
    env = roles["backend"]["environment"]
    assert all(role["environment"] == env and role["image"] == "ale-backend:latest" for role in roles.values())
    registry = urlsplit(env["MODEL_REGISTRY"])
    assert registry.scheme == "s3" and f"mb --ignore-existing store/{registry.hostname}" in services["bucket"][
        "command"][0]
    assert urlsplit(env["AWS_ENDPOINT_URL"]).hostname == "s3" and services["s3"]["command"][0] == "server"
    assert urlsplit(env["REDIS_URL"]).hostname == "redis"
    local = [v.split(":")[0] for role in roles.values() for v in role.get("volumes", [])
             if v.endswith(":" + env["MODEL_DIR"])]
    assert len(local) == len(set(local)) == 2 and set(local) <= set(HOSTS["volumes"])  # the scorers': their own
    for role in roles.values():
        assert role["depends_on"]["bucket"]["condition"] == "service_completed_successfully"
    for name, queues in (("trainer", "training"), ("scorer", "scoring")):
        command = services[name]["command"]
        assert command[:4] == ["python", "-m", "ale_backend", "worker"] and command[4:] == ["--queues", queues]
        shown = subprocess.run([sys.executable, "-m", "ale_backend", *command[3:], "--help"], cwd=ROOT,
                               capture_output=True, text=True, timeout=60)
        assert shown.returncode == 0, shown.stderr
    assert roles["backend"]["command"] == ["gunicorn", "_wsgi:app"] and roles["backend"]["build"]["dockerfile"] == \
        "docker/Dockerfile"


def test_every_backend_container_runs_under_an_init():
    """An init as PID 1 reaps orphans and forwards signals (the worker runs correctly as PID 1 too:
    tests/test_rescoring_parts.py runs it so)."""
    for stack in (COMPOSE, BACKEND_ONLY, HOSTS):
        ours = {name: service for name, service in stack["services"].items()
                if service.get("image") == "ale-backend:latest"}
        assert ours and all(service.get("init") is True for service in ours.values()), sorted(ours)
