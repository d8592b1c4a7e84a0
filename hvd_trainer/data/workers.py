"""How a rank's loader workers start: from a forkserver by default, never running the
launching script again.

``fork`` would copy a rank that already runs Horovod's background thread and MPI's own threads;
a lock one of them held at that moment stays locked in the child for good (the worker hangs on
its first batch, and with it the job). A forkserver is started by fork+exec before anything else
runs in it, and forks the workers from that clean, single-threaded process.
"""
from __future__ import annotations

import contextlib
import multiprocessing
import multiprocessing.context
import pickle
import pickletools
import sys
import types
import warnings

from torch.utils.data import DataLoader, Dataset

# What a forkserver loads once, so that each worker it forks starts with torch and the pipeline
# already imported (a worker then starts in milliseconds instead of a torch import).
FORKSERVER_PRELOAD = ["hvd_trainer.data.loaders"]


def _refers_to_main(blob: bytes) -> bool:
    """Whether a pickle names anything in ``__main__`` (a class or function of the launching
    script), which a forkserver worker could only find by running that script again."""
    return any(isinstance(arg, str) and arg == "__main__" for _, arg, _ in pickletools.genops(blob))


def worker_context(start: str, dataset: Dataset, rank: int = 0) -> multiprocessing.context.BaseContext:
    """How this rank's loader workers start (``data.worker_start``). A forkserver or spawn
    needs a data set that pickles without the launching script's own classes; any other falls
    back to fork, with a warning (rank 0). :class:`WorkerLoader` keeps the launching script
    from running again in the workers."""
    if start != "fork":
        try:
            why = "it refers to the launching script (__main__)" if _refers_to_main(pickle.dumps(dataset)) else ""
        except Exception as err:  # lambdas, open handles, locally defined classes ...
            why = f"it cannot be pickled ({type(err).__name__}: {err})"
        if why:
            if rank == 0:
                warnings.warn(f"data.worker_start={start}: the data set cannot go to the workers that way: {why}; "
                              "starting loader workers with fork, which can hang after MPI and Horovod start their "
                              "threads. Define it in an importable module, or set data.worker_start=fork to silence "
                              "this", RuntimeWarning, stacklevel=2)
            start = "fork"
    ctx = multiprocessing.get_context(start)
    if start == "forkserver":
        ctx.set_forkserver_preload(FORKSERVER_PRELOAD)  # read when the server starts: once per rank
    return ctx


@contextlib.contextmanager
def _launching_script_hidden():
    """While workers start: a ``__main__`` without a file or module name, so that multiprocessing
    does not tell a forkserver or spawned worker to run the launching script again (a training
    script without an ``if __name__ == "__main__"`` guard would train once more in every worker).
    The data set has been checked not to need it (:func:`worker_context`)."""
    main = sys.modules["__main__"]
    sys.modules["__main__"] = types.ModuleType("__main__")
    try:
        yield
    finally:
        sys.modules["__main__"] = main


class WorkerLoader(DataLoader):
    """A DataLoader whose forkserver or spawn workers start without the launching script."""

    def _get_iterator(self):
        if self.num_workers == 0 or self.multiprocessing_context is None \
                or self.multiprocessing_context.get_start_method() == "fork":
            return super()._get_iterator()
        with _launching_script_hidden():
            return super()._get_iterator()
