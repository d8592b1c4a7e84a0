"""``hvd-tune``: hyper-parameter trials packed into one allocation (see docs/tuning.md).

    study    the study file: base config, search space, sampler, pruner, packing
    space    a trial's parameters -> its training config
    storage  Optuna: the journal the groups share, sampler, pruner, claiming trials
    trials   one trial on its group: train(), the pruner after each epoch, the outcome
    packed   N ranks in N/k groups, each on its own communicator
    srun     each trial an srun step of k tasks inside the allocation
    results  the table, best.yaml, plots, hvd-report
"""
