"""TrainState writes exactly the checkpoint schema, and reads back what it wrote (one process)."""
import torch
from torch import nn

from hvd_trainer.checkpoint import SCHEMA, Checkpointer, load, validate
from hvd_trainer.config import load_config
from hvd_trainer.schedule import build_optimizer, build_scheduler
from hvd_trainer.state import TrainState
from hvd_trainer.strategies.single import SingleProcessStrategy


def _state(seed):
    cfg = load_config(None, ["optim.lr=0.1", "optim.schedule=cosine"])
    torch.manual_seed(seed)
    model = nn.Linear(4, 3)
    opt = build_optimizer(model.parameters(), cfg.optim, 1)
    sched = build_scheduler(opt, cfg.optim, 1, steps_per_epoch=5, epochs=2)
    return TrainState(model, opt, sched, SingleProcessStrategy(cfg), cfg.to_dict())


def test_state_dict_is_the_checkpoint_schema_and_round_trips(tmp_path):
    a = _state(0)
    for _ in range(3):  # momentum state, scheduler position, counters
        a.model(torch.randn(2, 4)).sum().backward()
        a.optimizer.step()
        a.scheduler.step()
    a.step, a.epoch, a.batch_in_epoch = 3, 0, 3
    payload = a.state_dict()
    assert payload.keys() == SCHEMA.keys() and validate(payload) is None
    path = Checkpointer(tmp_path).save(payload)
    expected_draw = torch.rand(2)  # the RNG stream right after the capture

    b = _state(1)
    assert b.load_state_dict(load(path)) is None
    assert (b.step, b.epoch, b.batch_in_epoch) == (3, 0, 3)
    assert torch.equal(b.model.weight, a.model.weight)
    assert b.optimizer.param_groups[0]["lr"] == a.optimizer.param_groups[0]["lr"]
    assert torch.equal(b.optimizer.state_dict()["state"][0]["momentum_buffer"],
                       a.optimizer.state_dict()["state"][0]["momentum_buffer"])
    assert torch.equal(torch.rand(2), expected_draw)


def test_a_checkpoint_of_another_model_is_a_one_line_config_error(tmp_path):
    import pytest
    from hvd_trainer.config import ConfigError

    path = Checkpointer(tmp_path).save(_state(0).state_dict())
    other = _state(0)
    other.model = nn.Linear(5, 3)
    with pytest.raises(ConfigError, match="written for another model"):
        other.load_state_dict(load(path))


def test_a_parameter_server_checkpoint_is_refused_by_another_strategy(tmp_path):
    import pytest
    from hvd_trainer.config import ConfigError

    payload = {**_state(0).state_dict(), "strategy": "ps"}
    with pytest.raises(ConfigError, match="written by strategy=ps, this run is strategy=single"):
        _state(0).load_state_dict(payload)
