"""Running a program inside a container image, the HPC "hybrid" way.

The host's launcher (``mpirun``, ``srun``) starts one container per rank, and the MPI library
inside the image joins the job through the host's runtime::

    mpirun -np 4 apptainer exec [--nv] IMG hvd-train my.yaml
    mpirun -np 4 singularity exec [--nv] IMG hvd-train my.yaml
    mpirun -np 4 ch-run IMG -- hvd-train my.yaml

That only works when the MPI inside the image is the MPI that launches it: the same
implementation and the same major.minor release (the launcher and the library speak a
version-specific runtime protocol; a mismatch typically fails inside ``MPI_Init`` with an
opaque error, or hangs). :func:`check_mpi` compares the two before anything is launched and
raises :class:`MpiMismatch` with one line naming both versions.

Everything here returns argument lists; nothing is joined into a shell string.
"""
from __future__ import annotations

import argparse
import getpass
import os
import re
import subprocess
from dataclasses import dataclass
from typing import Optional, Sequence

RUNTIMES = ("apptainer", "singularity", "charliecloud")
# The image layout containers/Dockerfile and containers/hvd-trainer.def produce.
IMAGE_PYTHON = "/opt/venv/bin/python"
# Overrides what the host's MPI is said to be (e.g. "Open MPI 4.0.3"): for a launcher that is not
# on PATH where the check runs, and to exercise the mismatch path in tests.
HOST_MPI_ENV = "HVD_TRAINER_HOST_MPI"

_PRINT_LIBRARY_VERSION = ("import mpi4py; mpi4py.rc.initialize = False; from mpi4py import MPI; "
                          "print(MPI.Get_library_version())")


def gpu_visible() -> bool:
    """True when an NVIDIA driver is loaded on this host (what ``--nv`` binds into the image)."""
    return os.path.exists("/dev/nvidiactl") or os.path.exists("/proc/driver/nvidia/version")


@dataclass(frozen=True, kw_only=True, slots=True)
class Container:
    """An image and the runtime that runs it; :meth:`wrap` turns a program into the command that
    runs it inside the image."""

    image: str
    """Apptainer/Singularity: a ``.sif`` file (or any image reference they accept);
    Charliecloud: an image name in ``ch-image`` storage, or an image directory."""
    runtime: str = "apptainer"
    """One of :data:`RUNTIMES`."""
    gpu: Optional[bool] = None
    """Bind the host's NVIDIA driver (``--nv``). None: only when :func:`gpu_visible`.
    Charliecloud has no such flag (inject the driver with ``ch-fromhost --nvidia`` once): asking
    for a GPU there is an error."""
    binds: tuple[str, ...] = ()
    """Host paths to mount inside, each ``SRC`` or ``SRC:DST`` (a shared file system, data)."""
    python: str = IMAGE_PYTHON
    """The interpreter inside the image that has mpi4py (used by :func:`image_mpi`)."""

    def __post_init__(self) -> None:
        if self.runtime not in RUNTIMES:
            raise ValueError(f"runtime: must be one of {', '.join(RUNTIMES)}, got {self.runtime!r}")
        if not self.image:
            raise ValueError("image: empty")
        if self.runtime == "charliecloud" and self.gpu:
            raise ValueError("gpu: ch-run has no --nv; inject the host's driver into the image "
                             "with ch-fromhost --nvidia, then run without gpu")

    def use_gpu(self) -> bool:
        if self.runtime == "charliecloud":
            return False
        return gpu_visible() if self.gpu is None else self.gpu

    def wrap(self, program: Sequence[str]) -> list[str]:
        """The argument list that runs ``program`` inside the image (put it after the launcher's
        own arguments: every rank runs it)."""
        if not program:
            raise ValueError("program: empty")
        if self.runtime == "charliecloud":
            # --set-env: the image's ENV (its PATH first). ch-run passes the host's environment
            # and shares /tmp and $HOME, so without it a host venv on PATH would run instead.
            cmd = ["ch-run", "--set-env"]
            for b in self.binds:
                cmd += ["--bind", b]
            return cmd + [self.image, "--"] + list(program)
        cmd = [self.runtime, "exec"]
        if self.use_gpu():
            cmd.append("--nv")
        for b in self.binds:
            cmd += ["--bind", b]
        return cmd + [self.image] + list(program)


@dataclass(frozen=True, slots=True)
class MpiVersion:
    """An MPI implementation and its release, e.g. ``MpiVersion("Open MPI", "4.1.4")``."""

    family: str
    version: str

    def series(self) -> tuple[str, ...]:
        """major.minor: releases in one series interoperate (launcher and library)."""
        return tuple(self.version.split(".")[:2])

    def __str__(self) -> str:
        return f"{self.family} {self.version}"


class MpiMismatch(RuntimeError):
    """The image's MPI cannot join a job launched by the host's MPI. ``str()`` is one line."""


_PATTERNS = (  # (family, regex with the version as group 1), tried in order
    ("Open MPI", r"Open MPI\)?\s+v?(\d+\.\d+(?:\.\d+)?)"),
    ("Intel MPI", r"Intel\(R\) MPI Library (?:for \S+ )?(?:Version )?(\d+(?:\.\d+)+)"),
    ("MVAPICH2", r"MVAPICH2?\s+Version\s*:?\s*(\d+(?:\.\d+)+)"),
    ("MPICH", r"MPICH Version:?\s*(\d+(?:\.\d+)+)"),
    ("MPICH", r"HYDRA build details:\s*Version:\s*(\d+(?:\.\d+)+)"),
)


def parse_mpi_version(text: str) -> MpiVersion:
    """Read an MPI name and version from ``mpirun --version``, ``MPI_Get_library_version`` or
    an override like ``Open MPI 4.1.4``. Raises ValueError naming the text when it finds none."""
    for family, pattern in _PATTERNS:
        m = re.search(pattern, text)
        if m:
            return MpiVersion(family, m.group(1))
    first = text.strip().splitlines()[0] if text.strip() else "(empty)"
    raise ValueError(f"cannot tell which MPI this is: {first[:120]!r}")


def host_mpi(launcher: str = "mpirun", timeout: float = 30) -> MpiVersion:
    """The MPI of the host's launcher (``$HVD_TRAINER_HOST_MPI`` wins when set)."""
    override = os.environ.get(HOST_MPI_ENV)
    if override:
        return parse_mpi_version(override)
    out = subprocess.run([launcher, "--version"], capture_output=True, text=True, timeout=timeout)
    return parse_mpi_version(out.stdout + out.stderr)


def image_mpi_command(container: Container) -> list[str]:
    """The command that prints the image's ``MPI_Get_library_version`` (without ``MPI_Init``)."""
    return container.wrap([container.python, "-c", _PRINT_LIBRARY_VERSION])


def image_mpi(container: Container, timeout: float = 120) -> MpiVersion:
    """The MPI library inside the image, as mpi4py reports it. Raises MpiMismatch (one line)
    when the image cannot be started or has no mpi4py."""
    cmd = image_mpi_command(container)
    try:
        out = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)
    except FileNotFoundError:
        raise MpiMismatch(f"{cmd[0]} not found: is the {container.runtime} runtime installed?") from None
    if out.returncode != 0:
        last = (out.stderr.strip().splitlines() or ["(no output)"])[-1]
        raise MpiMismatch(f"could not read the MPI version inside {container.image}: {last}")
    return parse_mpi_version(out.stdout)


def compare(host: MpiVersion, image: MpiVersion, image_name: str = "the image") -> None:
    """Raise MpiMismatch unless ``image`` can join a job launched by ``host``: the same
    implementation and the same major.minor series."""
    if host.family != image.family or host.series() != image.series():
        raise MpiMismatch(
            f"MPI mismatch: the host launches with {host} but {image_name} has {image}; "
            f"build the image with the host's MPI (containers/Dockerfile ARG OPENMPI_VERSION) "
            f"or load the matching MPI on the host")


def check_mpi(container: Container, launcher: str = "mpirun") -> tuple[MpiVersion, MpiVersion]:
    """Compare the host launcher's MPI with the image's; return both, or raise MpiMismatch."""
    host = host_mpi(launcher)
    image = image_mpi(container)
    compare(host, image, container.image)
    return host, image


def mpirun_settings(container: Container) -> dict:
    """Extra ``mpirun_command`` keyword arguments a runtime needs: ``ch-run`` puts each rank in a
    user namespace of its own, so Open MPI's single-copy shared memory (CMA) cannot cross ranks
    (turned off, instead of a warning and a fallback), and ``ch-run`` needs ``$USER``."""
    if container.runtime == "charliecloud":
        return {"mca": {"btl_vader_single_copy_mechanism": "none"}, "export": ["USER"]}
    return {}


# --- hvd-launch ------------------------------------------------------------------------------------

def add_arguments(parser) -> None:
    """The ``hvd-launch`` options of this module."""
    g = parser.add_argument_group("containers (every rank runs inside the image)")
    g.add_argument("--container", metavar="IMG", help="image: .sif file, or ch-image name/directory")
    g.add_argument("--runtime", choices=RUNTIMES, default="apptainer", help="default: apptainer")
    g.add_argument("--gpu", action=argparse.BooleanOptionalAction, default=None,
                   help="--nv (default: when this host has an NVIDIA driver)")
    g.add_argument("--bind", action="append", default=[], metavar="SRC[:DST]", help="mount into the image")
    g.add_argument("--no-mpi-check", action="store_true",
                   help="do not compare the image's MPI with the host's before launching")


def from_args(args) -> Optional[Container]:
    if not getattr(args, "container", None):
        return None
    return Container(image=args.container, runtime=args.runtime, gpu=args.gpu, binds=tuple(args.bind))


def preflight(args, launcher: str) -> Optional[str]:
    """Before launching for real: None when fine, else the one-line error to print. Only an
    ``mpirun`` launch is checked (under srun the host's MPI is SLURM's PMI, not a version)."""
    container = from_args(args)
    if container is None or args.no_mpi_check or launcher != "mpirun":
        return None
    if container.runtime == "charliecloud":
        os.environ.setdefault("USER", getpass.getuser())
    try:
        check_mpi(container)
    except (MpiMismatch, ValueError, OSError, subprocess.TimeoutExpired) as e:
        return f"hvd-launch: {e}"
    return None
