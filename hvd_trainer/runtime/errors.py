"""Errors the command line turns into one line and an exit code (no torch imported here)."""


class NonFiniteError(RuntimeError):
    """Training met NaN or infinity and ``optim.nonfinite`` says stop (or the skips ran out).
    The command exits 1; the last good checkpoint is kept and named."""


EXIT_PREEMPTED = 75  # EX_TEMPFAIL, "try again": a batch script requeues the job on it


class Preempted(SystemExit):
    """A stop signal (``checkpoint.stop_signals``) ended training at a step boundary on every
    rank, after a checkpoint; the process exits :data:`EXIT_PREEMPTED`, and a rerun with
    ``checkpoint.resume=auto`` continues exactly where it stopped."""

    def __init__(self, message: str) -> None:
        super().__init__(EXIT_PREEMPTED)
        self.message = message
