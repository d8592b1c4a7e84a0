"""Seeing inside a run: where each step's time goes on every rank, resource use, stragglers,
and the sinks that carry it out (TensorBoard, Prometheus, traces, ``hvd-report``).

The loop talks to one :class:`~hvd_trainer.monitor.monitor.Monitor` at a few fixed points; the
strategies mark the phases of a step on :class:`~hvd_trainer.monitor.phases.StepPhases`.
"""
