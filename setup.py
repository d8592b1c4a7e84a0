"""hvd-trainer: data-parallel PyTorch training over Horovod, a parameter server, or DDP.

Install with ``scripts/install.sh`` (it builds Horovod against the installed torch); a plain
``pip install -e .`` expects torch, mpi4py and a working Horovod to be present already.
"""
from setuptools import find_packages, setup

setup(
    name="hvd-trainer",
    version="0.1.0",
    description="High-performance data-parallel PyTorch trainer for HPC clusters",
    packages=find_packages(include=["hvd_trainer", "hvd_trainer.*", "mpi_jobs", "mpi_jobs.*", "benchmarks"]),
    package_data={"hvd_trainer": ["configs/*.yaml"]},
    python_requires=">=3.9",
    install_requires=[
        # torch is pinned by scripts/install.sh (2.13.0, CPU) or kept from the cluster's own
        # install (--system-torch); any torch >= 2.1 works once Horovod is built against it.
        "torch>=2.1",
        "numpy",
        "mpi4py>=3.1",
        "pyyaml",
        "pydantic>=2.7",
        "tqdm",
        "scikit-learn",
        "pillow",  # image folders (data.name: images)
        "matplotlib",  # hvd-bench's and hvd-report's plots
        "tensorboard",  # runtime.tensorboard (torch.utils.tensorboard writes, tests read back)
        "prometheus_client",  # runtime.metrics_port / metrics_textfile
        "optuna>=4.0",  # hvd-tune: samplers, pruners, the journal storage its groups share
    ],
    extras_require={"test": ["pytest", "pytest-timeout", "hypothesis"]},
    entry_points={
        "console_scripts": [
            "hvd-train=hvd_trainer.cli:main",
            "hvd-launch=mpi_jobs.cli:main",
            "hvd-bench=benchmarks.cli:main",
            "hvd-report=hvd_trainer.monitor.report:main",
            "hvd-tune=hvd_trainer.tune.cli:main",
        ]
    },
)
