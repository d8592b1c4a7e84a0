"""Container wrapping as argument lists: runtimes, --nv, binds, MPI version parsing and the
mismatch check, hvd-launch --container and batch scripts (no container is started here)."""
from __future__ import annotations

import subprocess

import pytest

from mpi_jobs import cli, containers
from mpi_jobs.containers import Container, MpiMismatch, MpiVersion, compare, parse_mpi_version
from mpi_jobs.slurm import BatchJob

PROGRAM = ["hvd-train", "my config.yaml", "optim.lr=0.1"]


@pytest.mark.parametrize("runtime", ["apptainer", "singularity"])
def test_apptainer_and_singularity_exec(runtime):
    c = Container(image="/images/hvd trainer.sif", runtime=runtime, gpu=False)
    assert c.wrap(PROGRAM) == [runtime, "exec", "/images/hvd trainer.sif", *PROGRAM]


@pytest.mark.parametrize("runtime", ["apptainer", "singularity"])
def test_nv_only_when_a_gpu_is_asked_for_or_visible(runtime, monkeypatch):
    assert Container(image="i.sif", runtime=runtime, gpu=True).wrap(["p"]) == [runtime, "exec", "--nv", "i.sif", "p"]
    monkeypatch.setattr(containers, "gpu_visible", lambda: True)
    assert "--nv" in Container(image="i.sif", runtime=runtime).wrap(["p"])
    assert "--nv" not in Container(image="i.sif", runtime=runtime, gpu=False).wrap(["p"])
    monkeypatch.setattr(containers, "gpu_visible", lambda: False)
    assert "--nv" not in Container(image="i.sif", runtime=runtime).wrap(["p"])


def test_charliecloud_runs_by_name_after_double_dash():
    c = Container(image="hvd-trainer", runtime="charliecloud", binds=("/data", "/scratch/x:/mnt/x"))
    assert c.wrap(PROGRAM) == ["ch-run", "--set-env", "--bind", "/data", "--bind", "/scratch/x:/mnt/x", "hvd-trainer",
                               "--", *PROGRAM]


def test_binds_for_apptainer_come_before_the_image():
    c = Container(image="i.sif", gpu=False, binds=("/data",))
    assert c.wrap(["p"]) == ["apptainer", "exec", "--bind", "/data", "i.sif", "p"]


def test_bad_containers_are_refused_naming_the_field():
    with pytest.raises(ValueError, match="runtime: must be one of"):
        Container(image="i", runtime="docker")
    with pytest.raises(ValueError, match="image: empty"):
        Container(image="")
    with pytest.raises(ValueError, match="gpu: ch-run has no --nv"):
        Container(image="i", runtime="charliecloud", gpu=True)
    with pytest.raises(ValueError, match="program: empty"):
        Container(image="i").wrap([])


def test_charliecloud_mpirun_settings():
    assert containers.mpirun_settings(Container(image="i", runtime="charliecloud")) == {
        "mca": {"btl_vader_single_copy_mechanism": "none"}, "export": ["USER"]}
    assert containers.mpirun_settings(Container(image="i.sif")) == {}


@pytest.mark.parametrize("text,family,version", [
    ("mpirun (Open MPI) 4.1.4\n\nReport bugs to http://www.open-mpi.org/community/help/\n", "Open MPI", "4.1.4"),
    ("Open MPI v4.1.4, package: Debian OpenMPI, ident: 4.1.4, repo rev: v4.1.4, May 26, 2022", "Open MPI", "4.1.4"),
    ("Open MPI 4.0.3", "Open MPI", "4.0.3"),
    ("MPICH Version:\t4.0.2\nMPICH Release date:\tThu Apr  7 12:34:45 CDT 2022", "MPICH", "4.0.2"),
    ("HYDRA build details:\n    Version:                                 4.1.1\n", "MPICH", "4.1.1"),
    ("Intel(R) MPI Library 2021.10 for Linux* OS", "Intel MPI", "2021.10"),
    ("MVAPICH2 Version      :\t2.3.7\n", "MVAPICH2", "2.3.7"),
])
def test_mpi_versions_are_read_from_launchers_and_libraries(text, family, version):
    assert parse_mpi_version(text) == MpiVersion(family, version)


def test_unknown_mpi_text_is_an_error_naming_it():
    with pytest.raises(ValueError, match="cannot tell which MPI this is: 'some other thing'"):
        parse_mpi_version("some other thing\nmore")


def test_same_series_matches_and_anything_else_is_a_one_line_error():
    compare(MpiVersion("Open MPI", "4.1.4"), MpiVersion("Open MPI", "4.1.6"))  # patch releases mix
    for image in (MpiVersion("Open MPI", "4.0.3"), MpiVersion("Open MPI", "5.0.3"), MpiVersion("MPICH", "4.1.4")):
        with pytest.raises(MpiMismatch) as err:
            compare(MpiVersion("Open MPI", "4.1.4"), image, "hvd-trainer")
        msg = str(err.value)
        assert "\n" not in msg and "Open MPI 4.1.4" in msg and str(image) in msg and "hvd-trainer" in msg


def test_image_version_is_read_without_mpi_init():
    cmd = containers.image_mpi_command(Container(image="hvd-trainer", runtime="charliecloud"))
    assert cmd[:5] == ["ch-run", "--set-env", "hvd-trainer", "--", "/opt/venv/bin/python"]
    assert "mpi4py.rc.initialize = False" in cmd[-1] and "Get_library_version" in cmd[-1]


def test_host_version_override(monkeypatch):
    monkeypatch.setenv(containers.HOST_MPI_ENV, "Open MPI 3.1.6")
    assert containers.host_mpi() == MpiVersion("Open MPI", "3.1.6")


def _launch(argv, capsys) -> tuple[int, str]:
    code = cli.main(argv)
    return code, capsys.readouterr().err


def test_hvd_launch_wraps_the_program(capsys):
    code, err = _launch(["--dry-run", "-np", "2", "--container", "hvd-trainer", "--runtime", "charliecloud",
                         "--", "hvd-train", "digits"], capsys)
    assert code == 0
    line = err.strip().splitlines()[-1]
    # (with fewer cores than ranks, e.g. under taskset -c 0, mpirun also gets --oversubscribe
    # and the MPI yield setting before -x: not this test's subject)
    assert "--mca btl_vader_single_copy_mechanism none" in line
    assert line.endswith("-x USER ch-run --set-env hvd-trainer -- hvd-train digits")
    code, err = _launch(["--dry-run", "-np", "2", "--container", "x.sif", "--runtime", "singularity", "--gpu",
                         "--", "hvd-train", "digits"], capsys)
    assert err.strip().endswith("singularity exec --nv x.sif hvd-train digits")


def test_hvd_launch_stops_on_a_mismatch_with_one_line(capsys, monkeypatch):
    monkeypatch.setenv(containers.HOST_MPI_ENV, "Open MPI 4.0.3")
    monkeypatch.setattr(containers, "image_mpi", lambda c, timeout=120: MpiVersion("Open MPI", "4.1.4"))
    monkeypatch.setattr(cli.os, "execvp", lambda *a: pytest.fail("launched despite the mismatch"))
    code, err = _launch(["-np", "2", "--container", "hvd-trainer", "--runtime", "charliecloud",
                         "--", "hvd-train", "digits"], capsys)
    assert code == 2
    assert err.strip().splitlines()[-1].startswith("hvd-launch: MPI mismatch: the host launches with Open MPI 4.0.3")


def test_hvd_launch_refuses_gpu_with_charliecloud(capsys):
    with pytest.raises(SystemExit) as e:
        cli.main(["-np", "2", "--container", "x", "--runtime", "charliecloud", "--gpu", "--", "hvd-train"])
    assert e.value.code == 2 and "ch-run has no --nv" in capsys.readouterr().err


@pytest.mark.parametrize("launcher", ["srun", "mpirun"])
def test_batch_script_runs_every_rank_in_the_image(launcher):
    job = BatchJob(program=PROGRAM, ntasks=4, launcher=launcher,
                   container=Container(image="/scratch/hvd trainer.sif", runtime="apptainer", gpu=True))
    launch = job.launch_command()
    assert launch[-len(PROGRAM) - 4:] == ["apptainer", "exec", "--nv", "/scratch/hvd trainer.sif", *PROGRAM]
    text = job.script()
    assert "apptainer exec --nv '/scratch/hvd trainer.sif' hvd-train 'my config.yaml' optim.lr=0.1" in text
    assert subprocess.run(["bash", "-n"], input=text, text=True).returncode == 0


def test_hvd_launch_sbatch_with_container(capsys):
    code = cli.main(["--sbatch", "job.sh", "--dry-run", "-np", "2", "--container", "hvd.sif", "--no-gpu",
                     "--", "hvd-train", "digits"])
    out = capsys.readouterr().out
    assert code == 0 and "srun --ntasks=2 --mpi=pmix --cpus-per-task=1 apptainer exec hvd.sif hvd-train digits" in out
