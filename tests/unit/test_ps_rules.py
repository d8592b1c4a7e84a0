"""The parameter server's consistency rules, driven without MPI: events in, actions out."""
import pytest

from hvd_trainer.strategies.ps.rules import Apply, AsyncRule, Drop, Reply, SSPRule, SyncRule
from hvd_trainer.strategies.ps.wire import partition


def test_sync_averages_every_worker_once_per_step():
    rule = SyncRule([0, 1, 2])
    assert rule.push(2, 1) == [] and rule.push(0, 1) == []
    assert rule.holds_buffer(2) and rule.blocked_on() == [1]  # waits only for the missing worker
    assert rule.push(1, 1) == [Apply((0, 1, 2), 0), Reply(2), Reply(0), Reply(1)]
    assert rule.version == 1 and not rule.holds_buffer(2) and rule.blocked_on() == [0, 1, 2]


def test_sync_with_a_backup_worker_steps_without_the_straggler_and_drops_it_late():
    rule = SyncRule([0, 1, 2], backup_workers=1)
    rule.push(0, 1)
    assert rule.push(2, 1) == [Apply((0, 2), 0), Reply(0), Reply(2)]
    assert rule.push(1, 1) == [Drop(1)]  # computed on version 0, the shard is at 1
    assert rule.version == 1


def test_sync_does_not_wait_for_a_finished_or_idle_worker():
    rule = SyncRule([0, 1])
    rule.push(0, 1)
    assert rule.went_idle(1, 0) == []  # idle at fewer pushes: about to push, wait for it
    assert rule.finished(1) == [Apply((0,), 0), Reply(0)]
    # backup workers: 0 and 2 end the epoch (2 steps) and sit in a collective; the straggler's
    # late push is dropped, its next one is a step of its own instead of a wait forever
    rule = SyncRule([0, 1, 2], backup_workers=1)
    for k in (1, 2):
        rule.push(0, k)
        rule.push(2, k)
    assert rule.version == 2
    assert rule.went_idle(0, 2) == [] and rule.went_idle(2, 2) == []
    assert rule.push(1, 1) == [Drop(1)]
    assert rule.went_idle(1, 0) == []  # a stale notice (older than its push) changes nothing
    # a step of its own, at the lr of the straggler's own 2nd step (index 1), not the shard's
    # 3rd: the schedule follows the workers' steps, so late applies do not run it ahead
    assert rule.push(1, 3) == [Apply((1,), 1), Reply(1)]
    assert rule.version == 3


def test_async_applies_each_push_at_once_and_measures_staleness():
    rule = AsyncRule([0, 1])
    for k in (1, 2, 3, 4):
        assert rule.push(0, k) == [Apply((0,), k - 1), Reply(0)]
    assert rule.max_staleness == 3  # worker 0's push 4 was 3 steps ahead of worker 1 (clock 0)
    assert rule.version == 4


@pytest.mark.parametrize("bound", [0, 1, 2])
def test_ssp_holds_a_worker_that_runs_too_far_ahead(bound):
    rule = SSPRule([0, 1], staleness=bound)
    replies = []
    for k in range(1, bound + 2):  # a held worker waits: it pushes no more until answered
        replies.append(any(isinstance(a, Reply) for a in rule.push(0, k)))
    assert replies == [True] * bound + [False]  # pushes 1..bound answered, bound + 1 held
    assert rule.blocked_on() == [1]
    released = rule.push(1, 1)
    assert Reply(0) in released  # the slowest moved on: the hold of bound + 1 ends
    rule.push(0, bound + 2)  # held again (the slowest is at 1)
    assert rule.finished(1) == [Reply(0)]  # a finished worker holds nobody back


def test_partition_is_contiguous_and_balanced():
    for total, parts in [(10, 3), (7, 7), (1_000_003, 4)]:
        bounds = partition(total, parts)
        assert bounds[0][0] == 0 and bounds[-1][1] == total
        assert all(a[1] == b[0] for a, b in zip(bounds, bounds[1:]))
        sizes = [hi - lo for lo, hi in bounds]
        assert max(sizes) - min(sizes) <= 1
