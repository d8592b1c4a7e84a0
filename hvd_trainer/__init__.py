"""hvd-trainer: data-parallel PyTorch training over Horovod, an mpi4py parameter server or DDP.

Python API::

    from hvd_trainer import load_config, train
    cfg = load_config("my.yaml", ["optim.lr=0.1"])
    summary = train(cfg, model=my_model, train_data=train_ds, test_data=test_ds, loss_fn=my_loss)

Run it under ``mpirun -np N python my_script.py`` like the CLI; every rank calls ``train``.
"""
from .runtime.launch_env import apply_torch_defaults

apply_torch_defaults()  # before anything imports torch (the allocator reads it once)

from .config import ConfigError, TrainConfig, load_config, replace  # noqa: E402

__all__ = ["ConfigError", "TrainConfig", "load_config", "replace", "train", "Trainer"]


def __getattr__(name):  # keep `import hvd_trainer` light: torch is imported on first use
    if name == "train":
        from .runner import train
        return train
    if name == "Trainer":
        from .trainer import Trainer
        return Trainer
    raise AttributeError(name)
