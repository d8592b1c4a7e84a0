"""Errors the command line turns into one line and an exit code (no torch imported here)."""


class NonFiniteError(RuntimeError):
    """Training met NaN or infinity and ``optim.nonfinite`` says stop (or the skips ran out).
    The command exits 1; the last good checkpoint is kept and named."""
