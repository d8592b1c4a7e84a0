"""The Horovod strategy's wake-on-wait setting (no MPI)."""
import pytest

from hvd_trainer.config import HorovodConfig
from hvd_trainer.strategies.horovod import apply_horovod_env


@pytest.mark.parametrize("environ,expected", [
    ({}, "1"),                                          # the trainer's default
    ({"HOROVOD_WAKE_ON_WAIT": "0"}, "0"),            # the environment wins
])
def test_wake_on_wait_is_exported_unless_the_environment_says_otherwise(environ, expected):
    eff = apply_horovod_env(HorovodConfig(), environ=environ)
    assert environ["HOROVOD_WAKE_ON_WAIT"] == expected == eff["HOROVOD_WAKE_ON_WAIT"]
    off = {}
    apply_horovod_env(HorovodConfig(wake_on_wait=False), environ=off)
    assert off["HOROVOD_WAKE_ON_WAIT"] == "0"
