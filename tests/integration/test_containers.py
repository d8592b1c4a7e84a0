"""The Dockerfile built for real and run the HPC way.

``containers/build.sh`` builds ``containers/Dockerfile`` with Charliecloud (no Docker daemon) from
a debootstrapped Debian base; then the host's ``mpirun`` starts one ``ch-run`` container per rank
and the Open MPI inside the image joins the job (the hybrid model Apptainer/Singularity use).

Asserted: the image's MPI library is the host's; two ranks train inside the image (started by
``mpirun ... ch-run IMG -- hvd-train`` and by ``hvd-launch --container``) and reach the accuracy
the same run reaches on the host; the program that ran is the image's, not the host's; a host/image
MPI mismatch stops hvd-launch with one line before anything is launched. With the hosts testbed
(mpi_jobs.testbed): one containerised rank on each of two hosts.
"""
from __future__ import annotations

import json
import os
import shutil
import sys
from pathlib import Path
from typing import Optional

import pytest

from conftest import BIN, REPO, run_cmd
from mpi_jobs import mpirun_command
from mpi_jobs.containers import Container, host_mpi, image_mpi, mpirun_settings, parse_mpi_version

IMAGE = "hvd-trainer-test"
BUILD_TIMEOUT = 40 * 60  # a cold build (base image, apt, pip; a Horovod build if its wheel is not cached)
TRAIN = ["hvd-train", "digits", "epochs=2", "runtime.progress=false", "checkpoint.every_epochs=0"]
IMAGE_HVD_TRAIN = ("/opt/venv/bin/hvd-train", "/usr/local/bin/hvd-train")  # where the image installs it


def _unavailable() -> Optional[str]:
    if os.geteuid() != 0:
        return "debootstrap and ch-image import need root"
    for tool in ("/usr/bin/ch-image", "ch-run", "debootstrap", "mpirun"):
        if not shutil.which(tool):
            return f"{tool} not found (scripts/install.sh installs Charliecloud and debootstrap)"
    if not Path("/etc/apt/sources.list.d/debian.sources").exists() and not Path("/etc/apt/sources.list").exists():
        return "no Debian mirror configured for debootstrap"
    return None


# the module's first test builds the image: its time limit covers a cold build
pytestmark = [pytest.mark.skipif(_unavailable() is not None, reason=f"containers: {_unavailable()}"),
              pytest.mark.timeout(BUILD_TIMEOUT + 600)]


@pytest.fixture(scope="module")
def image() -> Container:
    os.environ.setdefault("USER", "root")  # ch-run refuses to start without it
    res = run_cmd([str(REPO / "containers" / "build.sh"), "--tag", IMAGE, "--if-changed"], timeout=BUILD_TIMEOUT)
    assert res.returncode == 0, f"containers/build.sh failed:\n{res.output[-5000:]}"
    return Container(image=IMAGE, runtime="charliecloud")


def _summary(run_dir: Path) -> dict:
    return json.loads((run_dir / "summary.json").read_text())


def test_image_mpi_is_the_hosts(image):
    host, inside = host_mpi(), image_mpi(image)
    assert inside == host, (host, inside)
    # and from the library itself, not only the launcher's banner
    out = run_cmd([*image.wrap(["ompi_info", "--version"])], timeout=60)
    assert parse_mpi_version(out.stdout) == host


def test_program_is_the_images(image):
    probe = "import hvd_trainer, horovod, torch, sys; print(hvd_trainer.__file__, horovod.__version__, torch.__version__, sys.prefix)"
    res = run_cmd(image.wrap([image.python, "-c", probe]), timeout=120)
    assert res.returncode == 0, res.output
    path, hvd, torch_version, prefix = res.stdout.split()
    assert path.startswith("/opt/hvd-trainer/") and prefix == "/opt/venv"
    assert (hvd, torch_version) == ("0.28.1", "2.13.0+cpu")
    res = run_cmd(image.wrap(["sh", "-c", "command -v hvd-train"]), timeout=60)
    assert res.stdout.strip() in IMAGE_HVD_TRAIN, res.output


def test_mpirun_starts_one_container_per_rank(image, tmp_path):
    """The brief's form: mpirun -np 2 ch-run IMG -- hvd-train digits (Horovod ring-allreduce).
    Each rank, inside its container, names the hvd-train it runs, then becomes it (exec)."""
    where = ["sh", "-c", 'echo "rank $OMPI_COMM_WORLD_RANK runs $(command -v hvd-train)"; exec hvd-train "$@"', "sh"]
    cmd = mpirun_command(2, image.wrap([*where, *TRAIN[1:], f"run_dir={tmp_path / 'image'}"]), **mpirun_settings(image))
    res = run_cmd(cmd, timeout=300)
    assert res.returncode == 0, res.output[-4000:]
    ran = sorted(line for line in res.stdout.splitlines() if line.startswith("rank ") and " runs " in line)
    assert [line.split(" runs ")[0] for line in ran] == ["rank 0", "rank 1"], res.output[-3000:]
    assert all(line.split(" runs ")[1] in IMAGE_HVD_TRAIN for line in ran), ran  # not the host's
    s = _summary(tmp_path / "image")
    assert s["world_size"] == 2 and s["strategy"] == "horovod"
    assert s["final_test_accuracy"] > 0.9, s
    # the same run on the host: the same code, seed and arithmetic reach the same accuracy (a
    # couple of held-out samples of slack for a different build of the same versions)
    res = run_cmd(mpirun_command(2, [*TRAIN, f"run_dir={tmp_path / 'host'}"]), timeout=300)
    assert res.returncode == 0, res.output[-4000:]
    host = _summary(tmp_path / "host")
    assert abs(s["final_test_accuracy"] - host["final_test_accuracy"]) <= 0.01, (s, host)


def test_hvd_launch_container_checks_mpi_and_runs(image, tmp_path):
    cmd = [str(BIN / "hvd-launch"), "-np", "2", "--container", IMAGE, "--runtime", "charliecloud", "--",
           *TRAIN, "strategy=ddp", f"run_dir={tmp_path}"]
    res = run_cmd(cmd, timeout=300)
    assert res.returncode == 0, res.output[-4000:]
    assert "ch-run --set-env hvd-trainer-test -- hvd-train" in res.stderr
    s = _summary(tmp_path)
    assert s["world_size"] == 2 and s["strategy"] == "ddp" and s["final_test_accuracy"] > 0.9, s


def test_mpi_mismatch_is_one_line_and_launches_nothing(image, tmp_path):
    cmd = [str(BIN / "hvd-launch"), "-np", "2", "--container", IMAGE, "--runtime", "charliecloud", "--",
           *TRAIN, f"run_dir={tmp_path}"]
    res = run_cmd(cmd, timeout=120, env={"HVD_TRAINER_HOST_MPI": "Open MPI 4.0.3"})
    assert res.returncode == 2
    last = res.stderr.strip().splitlines()[-1]
    assert last == (f"hvd-launch: MPI mismatch: the host launches with Open MPI 4.0.3 but {IMAGE} has "
                    f"{image_mpi(image)}; build the image with the host's MPI (containers/Dockerfile ARG "
                    "OPENMPI_VERSION) or load the matching MPI on the host"), res.stderr
    assert not (tmp_path / "summary.json").exists()


def test_build_refuses_an_mpi_version_the_base_does_not_have(tmp_path):
    """The image's OPENMPI_VERSION is checked by install.sh (here on the host, same code path)."""
    res = run_cmd(["bash", str(REPO / "scripts" / "install.sh"), "--image"], timeout=120,
                  env={"HVD_TRAINER_MPI_VERSION": "4.0.3", "HVD_TRAINER_VENV": str(tmp_path / "venv")})
    assert res.returncode == 1
    assert "HVD_TRAINER_MPI_VERSION=4.0.3 but this system has 'mpirun (Open MPI) 4.1.4'" in res.stderr
    assert not (tmp_path / "venv").exists()


def test_one_container_per_testbed_host(image, tmp_path):
    """mpirun -H node1:1,node2:1 ... ch-run IMG -- hvd-train: one containerised rank on each of two
    namespace hosts (mpi_jobs.testbed), MPI over TCP on the testbed's subnet."""
    from hosts import SKIP_REASON, run_on, start_testbed

    if SKIP_REASON is not None:
        pytest.skip(f"hosts testbed: {SKIP_REASON}")
    tb = start_testbed(2)
    try:
        cmd = tb.mpirun_command(image.wrap([*TRAIN, f"run_dir={tmp_path}"]), hosts=2, **mpirun_settings(image))
        res = run_on(tb, tb.hosts[0], cmd, timeout=300)
        assert res.returncode == 0, res.output[-4000:] + tb.logs()
    finally:
        tb.stop()
    s = _summary(tmp_path)
    assert s["world_size"] == 2 and s["final_test_accuracy"] > 0.9, s
