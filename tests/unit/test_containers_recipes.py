"""The image recipes agree with each other and with scripts/install.sh.

The Apptainer definition cannot be built here (no Apptainer), so it is parsed: its header and
%sections, the build arguments it declares and uses, and that it installs through the same
script and runs the same program as the Dockerfile (which the integration tier builds and runs).
"""
from __future__ import annotations

import re
import shutil
import subprocess
from dataclasses import dataclass, field
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
DOCKERFILE = REPO / "containers" / "Dockerfile"
DEFFILE = REPO / "containers" / "hvd-trainer.def"
INSTALL = REPO / "scripts" / "install.sh"

# Apptainer's section names (https://apptainer.org/docs/user/main/definition_files.html)
SECTIONS = {"arguments", "setup", "files", "app", "post", "environment", "runscript", "startscript",
            "test", "labels", "help", "appfiles", "appinstall", "apphelp", "apprun", "applabels",
            "appenv", "apptest", "appstart"}
PINS = {"TORCH_VERSION": "2.13.0", "HOROVOD_VERSION": "0.28.1", "OPENMPI_VERSION": "4.1.4"}


@dataclass
class DefFile:
    header: dict[str, str]
    sections: dict[str, list[str]] = field(default_factory=dict)

    def arguments(self) -> dict[str, str]:
        out = {}
        for line in self.sections.get("arguments", []):
            if line.strip():
                key, sep, value = line.strip().partition("=")
                assert sep, f"%arguments line without '=': {line!r}"
                out[key] = value
        return out


def parse_def(text: str) -> DefFile:
    """Header ``Key: value`` lines up to the first ``%section``; then each section's body lines.
    Raises AssertionError on anything else (a stray line, an unknown or repeated section)."""
    header: dict[str, str] = {}
    sections: dict[str, list[str]] = {}
    current = None
    for n, line in enumerate(text.splitlines(), 1):
        if line.startswith("%"):
            name = line[1:].split()[0]
            assert name in SECTIONS, f"line {n}: unknown section %{name}"
            assert name not in sections, f"line {n}: %{name} twice"
            current = sections.setdefault(name, [])
        elif current is not None:
            current.append(line)
        elif line.strip() and not line.startswith("#"):
            key, sep, value = line.partition(":")
            assert sep and key.strip() and value.strip(), f"line {n}: not a 'Key: value' header line: {line!r}"
            header[key.strip()] = value.strip()
    return DefFile(header, sections)


def dockerfile_args(text: str) -> dict[str, str]:
    """``ARG NAME=default`` lines before the first FROM (the versions)."""
    head = text.split("\nFROM ", 1)[0]
    return dict(re.findall(r"^ARG (\w+)=(\S+)$", head, re.M))


def install_pins(text: str) -> dict[str, str]:
    torch = re.search(r'TORCH_PIN="torch==\$\{HVD_TRAINER_TORCH_VERSION:-([\d.]+)\}"', text)
    horovod = re.search(r'HOROVOD_VERSION="\$\{HVD_TRAINER_HOROVOD_VERSION:-([\d.]+)\}"', text)
    assert torch and horovod, "install.sh: pins not found where expected"
    return {"TORCH_VERSION": torch.group(1), "HOROVOD_VERSION": horovod.group(1)}


@pytest.fixture(scope="module")
def deffile() -> DefFile:
    return parse_def(DEFFILE.read_text())


def test_def_header_and_sections(deffile):
    assert deffile.header == {"Bootstrap": "docker", "From": "{{ BASE_IMAGE }}"}
    for name in ("arguments", "post", "runscript", "environment", "files", "test", "help", "labels"):
        assert deffile.sections.get(name), f"%{name} missing or empty"


def test_every_template_variable_is_a_declared_argument(deffile):
    text = DEFFILE.read_text()
    used = set(re.findall(r"\{\{\s*(\w+)\s*\}\}", text))
    assert used == set(deffile.arguments()), (used, deffile.arguments())


def test_same_pins_everywhere(deffile):
    docker = dockerfile_args(DOCKERFILE.read_text())
    args = deffile.arguments()
    for name, pin in PINS.items():
        assert docker[name] == pin and args[name] == pin, name
    assert install_pins(INSTALL.read_text()) == {k: PINS[k] for k in ("TORCH_VERSION", "HOROVOD_VERSION")}
    assert docker["BASE_IMAGE"] == args["BASE_IMAGE"] == "debian:bookworm"


def test_pinned_open_mpi_is_the_hosts():
    """The images carry Debian bookworm's Open MPI; the host's must be the same for the hybrid run."""
    if not shutil.which("mpirun"):
        pytest.skip("no mpirun on this host")
    out = subprocess.run(["mpirun", "--version"], capture_output=True, text=True, timeout=30).stdout
    assert f"(Open MPI) {PINS['OPENMPI_VERSION']}" in out


def _install_line(lines: list[str]) -> str:
    """The install command, with {{ VAR }} (Apptainer) and ${VAR} (Docker) both written VAR."""
    joined = " ".join(line.strip().rstrip("\\") for line in lines)
    joined = re.sub(r"\{\{ (\w+) \}\}|\$\{(\w+)\}", lambda m: m.group(1) or m.group(2), joined)
    m = re.search(r"HVD_TRAINER_TORCH_VERSION=\S+ HVD_TRAINER_HOROVOD_VERSION=\S+\s+"
                  r"HVD_TRAINER_MPI_VERSION=\S+ scripts/install.sh --image", joined)
    assert m, joined
    return re.sub(r"\s+", " ", m.group(0))


def test_both_install_with_the_same_script_and_run_hvd_train(deffile):
    docker = DOCKERFILE.read_text()
    def_line = _install_line(deffile.sections["post"])
    docker_line = _install_line(docker.splitlines())
    assert def_line == docker_line
    assert "HVD_TRAINER_VENV=/opt/venv" in docker and "HVD_TRAINER_VENV=/opt/venv" in "\n".join(deffile.sections["post"])
    assert 'ENTRYPOINT ["hvd-train"]' in docker
    assert [line.strip() for line in deffile.sections["runscript"] if line.strip()] == ['exec hvd-train "$@"']


def test_def_copies_what_install_needs(deffile):
    dests = {line.split()[0] for line in deffile.sections["files"] if line.strip()}
    assert {"setup.py", "hvd_trainer", "mpi_jobs", "scripts"} <= dests
    for src in dests:
        assert (REPO / src).exists(), src


def test_dockerfile_parses_for_charliecloud():
    """ch-image's own parser (it refuses e.g. FROM ${VAR}); skipped without Charliecloud."""
    if not Path("/usr/bin/ch-image").exists():
        pytest.skip("Charliecloud is not installed (scripts/install.sh installs it)")
    res = subprocess.run(["/usr/bin/python3", "/usr/bin/ch-image", "build", "--parse-only", "-f", str(DOCKERFILE),
                          str(REPO)], capture_output=True, text=True, timeout=60,
                         env={"USER": "hvd", "PATH": "/usr/bin:/bin", "HOME": str(Path.home())})
    assert res.returncode == 0, res.stdout + res.stderr
