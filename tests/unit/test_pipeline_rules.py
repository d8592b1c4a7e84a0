"""Pipeline parallelism's pure parts: the layout, the schedules, and cutting a model into stages."""
from __future__ import annotations

import itertools

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

from hvd_trainer.config import ConfigError, ModelConfig, load_config
from hvd_trainer.execution import LocalExecutor
from hvd_trainer.models import build_model
from hvd_trainer.parallel.layout import Layout
from hvd_trainer.parallel.schedule import actions, bubble_efficiency, simulate
from hvd_trainer.parallel.stages import balanced_bounds, cut, model_shapes, named_bounds

pytestmark = pytest.mark.unit


def test_layout_keeps_a_pipeline_on_consecutive_ranks():
    lay = Layout(6, 3)
    assert lay.replicas == 2
    assert lay.pipeline(1) == [3, 4, 5]
    assert lay.stage_group(2) == [2, 5]
    assert [(lay.replica_of(r), lay.stage_of(r)) for r in range(6)] == [(0, 0), (0, 1), (0, 2), (1, 0), (1, 1), (1, 2)]
    assert all(lay.rank_of(lay.replica_of(r), lay.stage_of(r)) == r for r in range(6))
    with pytest.raises(ValueError):
        Layout(4, 3)
    assert lay.describe(["a", "a", "a", "b", "b", "b"])[1] == "replica 1: stage 0=rank 3 (b)  stage 1=rank 4 (b)  stage 2=rank 5 (b)"


@pytest.mark.parametrize("schedule", ["gpipe", "1f1b"])
@pytest.mark.parametrize("stages,m", [(1, 1), (2, 1), (2, 4), (3, 2), (4, 8), (3, 5)])
def test_every_microbatch_once_forward_before_backward_backwards_in_order(schedule, stages, m):
    for s in range(stages):
        plan = actions(schedule, s, stages, m)
        assert sorted(plan) == sorted([("F", i) for i in range(m)] + [("B", i) for i in range(m)])
        assert all(plan.index(("F", i)) < plan.index(("B", i)) for i in range(m))
        assert [i for k, i in plan if k == "B"] == list(range(m))  # the last backward is m-1's


@settings(max_examples=60, deadline=None)
@given(stages=st.integers(1, 6), m=st.integers(1, 12), schedule=st.sampled_from(["gpipe", "1f1b"]))
def test_the_stages_never_deadlock_and_the_bubble_is_the_theory(stages, m, schedule):
    sim = simulate(schedule, stages, m)
    # forward and backward cost one unit each: 2(m + P - 1) units, of which each stage is busy 2m
    assert sim.finish == 2 * (m + stages - 1)
    assert sim.efficiency(m, stages) == pytest.approx(bubble_efficiency(stages, m))


@pytest.mark.parametrize("stages,m", [(2, 8), (4, 8), (3, 3)])
def test_1f1b_holds_at_most_p_minus_stage_microbatches_gpipe_all(stages, m):
    gpipe, one = simulate("gpipe", stages, m), simulate("1f1b", stages, m)
    assert gpipe.peak_in_flight == [m] * stages
    assert one.peak_in_flight == [min(m, stages - s) for s in range(stages)]


def test_a_schedule_that_waits_in_a_cycle_is_reported():
    import hvd_trainer.parallel.schedule as sched

    def backwards_first(schedule, stage, stages, m):  # B(0) before F(0): can never run
        return [("B", 0), ("F", 0)]
    real = sched.actions
    sched.actions = backwards_first
    try:
        with pytest.raises(RuntimeError, match="deadlock"):
            simulate("gpipe", 2, 1)
    finally:
        sched.actions = real


@settings(max_examples=80, deadline=None)
@given(weights=st.lists(st.integers(0, 50), min_size=1, max_size=8), stages=st.integers(1, 4))
def test_the_balanced_cut_is_the_best_contiguous_cut(weights, stages):
    def loads(b):
        ends = list(b[1:]) + [len(weights)]
        return [sum(weights[s:e]) for s, e in zip(b, ends)]
    feasible = [(0, *c) for c in itertools.combinations(range(1, len(weights)), stages - 1)
                if min(loads((0, *c))) > 0]  # every stage holds parameters
    if not feasible:
        with pytest.raises(ConfigError, match="blocks with parameters"):
            balanced_bounds(weights, stages)
        return
    bounds = balanced_bounds(weights, stages)
    assert bounds[0] == 0 and len(bounds) == stages and bounds == sorted(set(bounds))
    assert min(loads(bounds)) > 0
    assert max(loads(bounds)) == min(max(loads(b)) for b in feasible)


def test_a_stage_without_parameters_is_refused():
    model = nn.Sequential(nn.Linear(2, 2), nn.ReLU(), nn.Linear(2, 2))
    assert balanced_bounds([6, 0, 6], 2) in ([0, 1], [0, 2])
    with pytest.raises(ConfigError, match="stage 1 would hold no parameters"):
        cut(model, 0, 3, cuts=["1", "2"])


def test_named_cuts():
    names = ["embed", "blocks.0", "blocks.1", "head"]
    assert named_bounds(names, ["blocks.1"], 2) == [0, 2]
    with pytest.raises(ConfigError, match="no block named 'blocks.7'"):
        named_bounds(names, ["blocks.7"], 2)
    with pytest.raises(ConfigError, match="in order"):
        named_bounds(names, ["blocks.1", "blocks.0"], 3)
    with pytest.raises(ConfigError, match="need 1 cut points"):
        named_bounds(names, [], 2)


def _models():
    torch.manual_seed(0)
    tfm = build_model(ModelConfig(name="transformer", layers=3, heads=2, width=16), (12,), 256)
    res = build_model(ModelConfig(name="resnet", channels=[4, 8], blocks_per_stage=1), (3, 8, 8), 5)
    mlp = build_model(ModelConfig(name="mlp", hidden=[16, 8]), (10,), 3)
    seq = nn.Sequential(nn.Linear(6, 5), nn.Tanh(), nn.Linear(5, 4), nn.Tanh(), nn.Linear(4, 3))
    return [(tfm, torch.randint(0, 256, (3, 12))), (res, torch.randn(3, 3, 8, 8)), (mlp, torch.randn(3, 10)),
            (seq, torch.randn(3, 6))]


@pytest.mark.parametrize("index", range(4))
@pytest.mark.parametrize("stages", [2, 3])
def test_the_stages_chained_are_the_model_and_their_state_is_the_models(index, stages):
    model, x = _models()[index]
    model.eval()
    whole = model.state_dict()
    parts = [cut(model, s, stages) for s in range(stages)]
    y = x
    for p in parts:
        p.eval()
        y = p(y)
    torch.testing.assert_close(y, model(x), rtol=0, atol=0)
    merged: dict = {}
    for p in parts:
        names = p.whole_names(p.state_dict())
        assert not merged.keys() & names.keys()  # each tensor on one stage
        merged.update(names)
        own = p.own_part(whole)
        assert own.keys() == p.state_dict().keys()
        p.load_state_dict(own)
        assert model_shapes(p) == {k: list(v.shape) for k, v in whole.items()}
    assert merged.keys() == whole.keys()
    assert all(torch.equal(merged[k], whole[k]) for k in whole)


def test_a_model_without_blocks_cannot_be_cut():
    class Opaque(nn.Module):
        def __init__(self):
            super().__init__()
            self.a = nn.Linear(2, 2)

        def forward(self, x):
            return self.a(x)
    with pytest.raises(ConfigError, match="nn.Sequential or has pipeline_blocks"):
        cut(Opaque(), 0, 2)


def test_a_pipeline_checkpoint_is_refused_without_stages_in_one_line():
    payload = {"model": {}, "optimizer": {"pipeline_stages": 2, "stages": [{}, {}]}}
    with pytest.raises(ConfigError) as err:
        LocalExecutor().own_state(nn.Linear(1, 1), payload)
    assert "pipeline_stages=2" in str(err.value) and "\n" not in str(err.value)


@pytest.mark.parametrize("override,key", [
    (["parallel.pipeline_stages=2", "model.sync_batchnorm=true"], "model.sync_batchnorm"),
    (["parallel.pipeline_stages=3", "parallel.cuts=[net.3]"], "parallel.cuts"),
    (["parallel.schedule=zb"], "parallel.schedule"),
    (["parallel.pipeline_stages=0"], "parallel.pipeline_stages"),
])
def test_bad_parallel_settings_name_the_key(override, key):
    with pytest.raises(ConfigError, match=key.replace(".", r"\.")):
        load_config("digits", override)


@pytest.mark.parametrize("strategy,world,extra,message", [
    ("ps", 2, [], "strategy ps does not run pipeline stages"),
    ("horovod", 3, [], "2 stages do not divide the 3 ranks"),
    ("horovod", 2, ["parallel.microbatches=32"], "parallel.microbatches: 32 is more than batch_size 16"),
    ("horovod", 2, ["data.name=shards", "data.path=/dev/null", "data.test_path=/dev/null"], "data.name: shards"),
])
def test_layouts_no_pipeline_can_run_are_refused_before_any_collective(strategy, world, extra, message):
    from hvd_trainer.parallel.executor import check_pipeline
    from hvd_trainer.strategies import strategy_class

    cfg = load_config("digits", [f"strategy={strategy}", "parallel.pipeline_stages=2", *extra])
    with pytest.raises(ConfigError, match=message):
        check_pipeline(cfg, world, strategy_class(strategy).pipelines)
