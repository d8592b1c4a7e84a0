import pytest
import torch
from torch import nn

from hvd_trainer import syncbn
from hvd_trainer.config import load_config
from hvd_trainer.schedule import build_optimizer, build_scheduler
from hvd_trainer.strategies.horovod import DEFAULT_CYCLE_TIME_MS, WAKE_CYCLE_TIME_MS, apply_horovod_env, patched_build
from mpi_jobs import horovodrun_command, mpirun_command, srun_command


def _lrs(overrides, dp_size, steps_per_epoch=10, epochs=4):
    cfg = load_config(None, overrides)
    opt = build_optimizer([nn.Parameter(torch.zeros(1))], cfg.optim, dp_size)
    sched = build_scheduler(opt, cfg.optim, dp_size, steps_per_epoch, epochs)
    out = []
    for _ in range(steps_per_epoch * epochs):
        out.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
    return out


def test_linear_scaling_with_warmup_starts_at_base_lr():
    lrs = _lrs(["optim.lr=0.1", "optim.warmup_epochs=1"], dp_size=4)
    assert lrs[0] == pytest.approx(0.1) and lrs[10] == pytest.approx(0.4) and lrs[5] == pytest.approx(0.25)


def test_scaling_rules_and_cosine():
    assert _lrs(["optim.lr=0.1", "optim.lr_scaling=sqrt"], 4)[0] == pytest.approx(0.2)
    assert _lrs(["optim.lr=0.1", "optim.lr_scaling=none"], 4)[0] == pytest.approx(0.1)
    cos = _lrs(["optim.lr=0.1", "optim.schedule=cosine"], 1)
    assert cos[0] == pytest.approx(0.1) and cos[-1] < 0.001 and cos[20] == pytest.approx(0.05)
    step = _lrs(["optim.lr=0.1", "optim.schedule=step", "optim.step_epochs=[2]", "optim.gamma=0.5"], 1)
    assert step[19] == pytest.approx(0.1) and step[20] == pytest.approx(0.05)


def test_global_batchnorm_matches_batchnorm_on_one_process():
    torch.manual_seed(0)
    ref = nn.BatchNorm2d(4)
    ours = syncbn.convert(nn.Sequential(nn.BatchNorm2d(4)), syncbn.global_bn(lambda t: t))[0]
    x1 = torch.randn(6, 4, 5, 5, requires_grad=True)
    x2 = x1.detach().clone().requires_grad_()
    y1, y2 = ref(x1), ours(x2)
    torch.testing.assert_close(y1, y2, rtol=1e-4, atol=1e-5)
    (y1 * torch.arange(6.0)[:, None, None, None]).sum().backward()
    (y2 * torch.arange(6.0)[:, None, None, None]).sum().backward()
    torch.testing.assert_close(x1.grad, x2.grad, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(ref.running_var, ours.running_var)
    ref.eval(); ours.eval()
    torch.testing.assert_close(ref(x1), ours(x2))


def test_horovod_env_knobs_environment_wins():
    cfg = load_config(None, ["horovod.fusion_threshold_mb=2", "horovod.cycle_time_ms=7"]).horovod
    env = {"HOROVOD_CYCLE_TIME": "0.5"}
    eff = apply_horovod_env(cfg, env)
    assert env["HOROVOD_FUSION_THRESHOLD"] == str(2 * 1024 * 1024) and eff["HOROVOD_CYCLE_TIME"] == "0.5"
    env = {}
    apply_horovod_env(load_config(None).horovod, env)
    # the patched build wakes on a wait, so on CPU its cycle only paces negotiation: a long one
    cycle = WAKE_CYCLE_TIME_MS if patched_build() else DEFAULT_CYCLE_TIME_MS
    assert env == {"HOROVOD_CYCLE_TIME": f"{cycle:g}", "OMPI_MCA_mpi_yield_when_idle": "1",
                   "HOROVOD_WAKE_ON_WAIT": "1"}
    for environ, cpu in (({"HOROVOD_WAKE_ON_WAIT": "0"}, True), ({}, False)):  # not woken, or a GPU
        apply_horovod_env(load_config(None).horovod, environ, cpu=cpu)
        assert environ["HOROVOD_CYCLE_TIME"] == f"{DEFAULT_CYCLE_TIME_MS:g}"


def test_the_installed_horovod_is_the_patched_build():
    """scripts/install.sh applies scripts/horovod-wake-on-wait.patch; the defaults above rely on it."""
    assert patched_build()


def test_launch_commands_are_argument_lists():
    cmd = mpirun_command(3, ["hvd-train", "a b.yaml"], hosts={"n1": 1, "n2": 2}, env={"A": "1 2"},
                         tcp_subnet="198.18.0.0/24", oversubscribe=True, yield_when_idle=True, allow_root=False)
    assert cmd[:3] == ["mpirun", "-np", "3"] and cmd[-2:] == ["hvd-train", "a b.yaml"]
    assert ["-H", "n1:1,n2:2"] == cmd[cmd.index("-H"):cmd.index("-H") + 2]
    assert ["-x", "A=1 2"] == cmd[cmd.index("-x"):cmd.index("-x") + 2]
    assert "--oversubscribe" in cmd and "btl_tcp_if_include" in cmd and "mpi_yield_when_idle" in cmd
    assert horovodrun_command(2, ["x"], gloo=True)[:5] == ["horovodrun", "-np", "2", "-H", "localhost:2"]
    assert srun_command(4, ["x"], nodes=2) == ["srun", "--ntasks=4", "--mpi=pmix", "--cpus-per-task=1", "--nodes=2", "x"]


def test_hvd_launch_sbatch_honours_hosts_map_by_dry_run_and_requeue(tmp_path, capsys):
    from mpi_jobs.cli import main

    out = tmp_path / "job.sh"
    assert main(["--sbatch", str(out), "--dry-run", "--launcher", "mpirun", "-np", "4", "--hosts", "n1:2,n2:2",
                 "--map-by", "ppr:2:node", "--no-requeue", "--", "hvd-train", "digits"]) == 0
    script = capsys.readouterr().out
    assert not out.exists()  # a dry run writes nothing
    assert "#SBATCH --nodelist=n1,n2" in script and "#SBATCH --nodes=2" in script
    assert "--map-by ppr:2:node" in script and "#SBATCH --requeue" not in script
    assert main(["--sbatch", str(out), "-np", "2", "--", "hvd-train", "digits"]) == 0
    assert "#SBATCH --requeue" in out.read_text()
    with pytest.raises(SystemExit):
        main(["--sbatch", str(out), "-np", "2", "--map-by", "node", "--", "hvd-train", "digits"])  # srun


def test_no_module_imports_upward():
    # the loop (trainer, state, cli) stands on strategies and checkpoint, never the reverse
    import ast
    from pathlib import Path

    import hvd_trainer

    root = Path(hvd_trainer.__file__).parent
    loop = {"trainer", "state", "cli", "output", "data"}
    for path in root.rglob("*.py"):
        rel = path.relative_to(root)
        for node in ast.walk(ast.parse(path.read_text())):
            if not isinstance(node, ast.ImportFrom) or not node.module:
                continue
            target = node.module.split(".")[-1] if node.level else node.module.removeprefix("hvd_trainer.")
            if rel.parts[0] == "strategies":
                assert target not in loop, f"{rel} imports {node.module}"
            if rel.name == "checkpoint.py":
                assert "strategies" not in node.module, f"{rel} imports {node.module}"
