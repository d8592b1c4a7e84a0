"""Pipeline parallelism, composed with the data-parallel strategies.

    layout    which rank holds which stage of which replica (world = replicas x stages)
    schedule  the order of forward and backward passes on each stage (GPipe, 1F1B): pure rules
    stages    cutting a model into stages of consecutive blocks, and their state under the
              whole model's names
    executor  running a step's forward and backward over the stages (mpi4py point-to-point)

The loop does not know any of it: a pipeline is a :class:`~.executor.PipelineExecutor` behind
the strategy's executor seam, and the strategy exchanges gradients among the replicas of a stage.
"""
