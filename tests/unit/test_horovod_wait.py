"""The Horovod strategy's wait after backward (no MPI: a stand-in for ``horovod.torch``)."""
import pytest

from hvd_trainer.config import HorovodConfig
from hvd_trainer.strategies.horovod import apply_horovod_env, wait_for


class FakeHvd:
    """Handle h completes after it has been polled ``h`` times."""

    def __init__(self):
        self.polls: dict[int, int] = {}

    def poll(self, handle: int) -> bool:
        self.polls[handle] = self.polls.get(handle, 0) + 1
        return self.polls[handle] >= handle


def test_wait_for_returns_once_every_handle_is_done_and_skips_unfired_ones():
    hvd = FakeHvd()
    wait_for(hvd, [3, None, 1, 5], poll_s=1e-6)
    assert hvd.polls[5] == 5 and hvd.polls[3] == 3  # polled until done ...
    assert hvd.polls[1] == 1                          # ... and not after
    wait_for(hvd, [None, lambda: None], poll_s=1e-6)   # nothing to wait for: a hook not fired, a sparse op


def test_wait_for_without_a_poll_interval_leaves_the_wait_to_synchronize():
    """poll 0 (the default): no poll loop beside the allreduce; hvd.synchronize waits."""
    hvd = FakeHvd()
    wait_for(hvd, [3, 5], poll_s=0)
    assert hvd.polls == {}


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
