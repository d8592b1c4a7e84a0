"""The config's sections: one small frozen model per component, composed by :class:`TrainConfig`.
Each field's docstring is its documentation (docs/config-reference.md is generated from them)."""
from __future__ import annotations

import glob
from pathlib import Path
from typing import Any, Literal, Optional

from pydantic import Field, field_validator, model_validator

from .base import INT_LIMIT, ConfigError, _FieldError, _Section  # noqa: F401 (re-exported)
from .run import CheckpointConfig, RuntimeConfig


class DataConfig(_Section):
    name: Literal["digits", "synthetic", "npz", "shards", "images", "text"] = "digits"
    """Data set: the digits set scikit-learn ships, seeded synthetic data, a user's .npz, a
    glob of .npz shards (each rank opens only its own), a folder of class subfolders of
    PNG/JPEG images (decoded in the loader's workers), or plain text as byte tokens (a language
    model's next-byte targets)."""
    path: Optional[str] = None
    """For ``npz``: a file with x_train, y_train, x_test, y_test (or x, y split by test_fraction).
    For ``shards``: a glob of training shards, each an .npz with ``x`` and ``y``. For ``images``:
    the root folder, one subfolder per class. For ``text``: a glob of text files, read in sorted
    order and concatenated (default: the ``.py`` sources of Python's standard library)."""
    test_path: Optional[str] = None
    """For ``shards``: a glob of held-out shards (required). For ``images``: a root folder of
    held-out images (default: split the training folder by test_fraction)."""
    num_workers: int = Field(2, ge=0, le=256)
    """Loader worker processes per rank for data sets that are not in-memory tensors (decode
    and augmentation run there); 0: in the training process. In-memory tensors never use them."""
    prefetch_factor: int = Field(2, ge=1, le=1024)
    """Batches each worker prepares ahead (num_workers > 0)."""
    pin_memory: bool = True
    """Page-locked host batches for faster, asynchronous copies to the GPU (CUDA only)."""
    persistent_workers: bool = True
    """Keep the workers alive from one epoch to the next (num_workers > 0)."""
    worker_start: Literal["fork", "forkserver", "spawn"] = "forkserver"
    """How loader workers start. ``forkserver`` (default): forked from a clean helper process
    that has torch loaded; needs a picklable data set (one that is not falls back to fork, with
    a warning). ``fork``: copies the rank after MPI and Horovod have started threads, which can
    leave a worker stuck on a lock for good. ``spawn``: a fresh
    interpreter per worker."""
    uneven_shards: Literal["pad", "truncate"] = "pad"
    """For ``shards``: ranks whose shards hold fewer samples than the largest rank's repeat some
    of their own (``pad``), or every rank stops at the smallest rank's count (``truncate``); so
    every rank runs the same number of steps."""
    augment: Literal["none", "crop_flip"] = "none"
    """For ``images``: training augmentation (random 4-pixel-padded crop and horizontal flip);
    seeded per sample, so it is reproducible at any worker count and across a resume."""
    image_size: Optional[list[int]] = None
    """For ``images``: resize every image to [height, width] (default: they must agree)."""
    image_mode: Literal["RGB", "L"] = "RGB"
    """For ``images``: decode to 3-channel colour or 1-channel grey."""
    bad_samples: Literal["error", "skip"] = "error"
    """For ``images``: a file that cannot be decoded (corrupt, truncated, gone) stops the job with
    one line naming it (``error``), or is left out of its batch, counted and listed in the
    summary (``skip``)."""
    test_fraction: float = Field(0.2, gt=0.0, lt=1.0)
    """Held-out share when the data set has no test split of its own."""
    seq_len: int = Field(64, ge=1)
    """For ``text``: tokens per sample; the text is cut into non-overlapping windows of
    seq_len + 1 bytes (inputs, and the same bytes shifted by one as targets)."""
    text_bytes: int = Field(1_000_000, ge=0)
    """For ``text``: read at most this many bytes of the files (0: all of them)."""
    synthetic_samples: int = Field(2048, ge=2)
    """For ``synthetic``: number of samples (train + test)."""
    synthetic_shape: list[int] = Field(default_factory=lambda: [3, 32, 32])
    """For ``synthetic``: shape of one input sample."""
    synthetic_classes: int = Field(10, ge=2)
    """For ``synthetic``: number of classes."""
    shuffle: bool = True
    """Reshuffle the training shard order every epoch (DistributedSampler, seeded per epoch)."""
    drop_last: bool = False
    """Drop each rank's last incomplete batch."""

    @model_validator(mode="after")
    def _check(self) -> "DataConfig":
        if self.name == "npz":
            if not self.path:
                raise _FieldError("path", "data.name=npz needs data.path")
            if not Path(self.path).is_file():
                raise _FieldError("path", f"file not found: {self.path}")
        if self.name == "shards":
            for key in ("path", "test_path"):
                pattern = getattr(self, key)
                if not pattern:
                    raise _FieldError(key, f"data.name=shards needs data.{key} (a glob of .npz shards)")
                if not glob.glob(pattern):
                    raise _FieldError(key, f"no file matches {pattern}")
        if self.name == "images":
            for key in ("path", "test_path"):
                root = getattr(self, key)
                if (key == "path" and not root) or (root and not Path(root).is_dir()):
                    raise _FieldError(key, f"data.name=images needs a folder of class subfolders, got {root}")
        if self.name == "text" and self.path and not any(
                Path(p).is_file() for p in glob.glob(self.path, recursive=True)):
            raise _FieldError("path", f"no file matches {self.path}")
        if self.image_size is not None and (len(self.image_size) != 2 or min(self.image_size) < 1):
            raise _FieldError("image_size", f"expected [height, width], got {self.image_size}")
        if any(d < 1 for d in self.synthetic_shape) or not self.synthetic_shape:
            raise _FieldError("synthetic_shape", "expected a list of positive ints")
        return self


class ModelConfig(_Section):
    name: Literal["mlp", "resnet", "transformer"] = "mlp"
    """Built-in model: a multi-layer perceptron, a small ResNet-style CNN (with BatchNorm), or
    a GPT-style decoder-only causal language model over token sequences (``data.name: text``)."""
    hidden: list[int] = Field(default_factory=lambda: [128, 64])
    """MLP hidden layer widths."""
    dropout: float = Field(0.0, ge=0.0, lt=1.0)
    """Dropout probability (MLP, transformer)."""
    channels: list[int] = Field(default_factory=lambda: [32, 64, 128])
    """ResNet stage widths; each stage after the first halves the resolution."""
    blocks_per_stage: int = Field(1, ge=1)
    """ResNet residual blocks in each stage."""
    layers: int = Field(2, ge=1)
    """Transformer blocks."""
    heads: int = Field(4, ge=1)
    """Transformer attention heads; ``width`` must be a multiple of it."""
    width: int = Field(128, ge=1)
    """Transformer embedding width (the MLP inside each block is 4x as wide)."""
    sync_batchnorm: bool = False
    """Use synchronous BatchNorm across ranks; otherwise rank 0's BN buffers are broadcast
    before evaluation and checkpointing."""
    recompute: bool = False
    """Activation recomputation: keep only each block's input in the forward pass and recompute
    the rest during backward (``torch.utils.checkpoint``): less memory, ~1 more forward of compute."""

    @model_validator(mode="after")
    def _check(self) -> "ModelConfig":
        if self.recompute and self.sync_batchnorm:  # a recomputed forward would allreduce again in backward
            raise _FieldError("recompute", "not supported with model.sync_batchnorm")
        if self.width % self.heads:
            raise _FieldError("width", f"must be a multiple of model.heads ({self.heads}), got {self.width}")
        return self


class OptimConfig(_Section):
    name: Literal["sgd", "adam", "adamw"] = "sgd"
    """torch.optim optimizer."""
    lr: float = Field(0.05, gt=0.0)
    """Base learning rate for one rank (before scaling)."""
    momentum: float = Field(0.9, ge=0.0, lt=1.0)
    """SGD momentum."""
    weight_decay: float = Field(0.0, ge=0.0)
    """Weight decay."""
    lr_scaling: Literal["linear", "sqrt", "none"] = "linear"
    """How the lr grows with the number of data-parallel ranks (Goyal et al.'s linear rule)."""
    warmup_epochs: float = Field(0.0, ge=0.0)
    """Ramp linearly from the base lr to the scaled lr over this many epochs."""
    schedule: Literal["constant", "cosine", "step"] = "constant"
    """Learning-rate schedule after warmup (per optimizer step)."""
    step_epochs: list[int] = Field(default_factory=list)
    """For ``step``: epochs at which the lr is multiplied by ``gamma``."""
    gamma: float = Field(0.1, gt=0.0, le=1.0)
    """For ``step``: decay factor."""
    grad_clip: float = Field(0.0, ge=0.0)
    """Clip the global gradient norm to this value after the allreduce (0: off)."""
    accumulation_steps: int = Field(1, ge=1)
    """Micro-batches per optimizer step (Horovod's backward_passes_per_step)."""
    nonfinite: Literal["stop", "skip"] = "stop"
    """A step whose averaged gradient holds NaN or infinity: ``stop`` the run with an error
    (keeping the last good checkpoint), or ``skip`` the update, up to ``max_skipped_steps``."""
    max_skipped_steps: int = Field(10, ge=0)
    """With ``nonfinite: skip``: skipped steps allowed in a run before it stops."""
    precision: Literal["fp32", "bf16", "fp16"] = "fp32"
    """Forward/loss precision: fp32, bf16 autocast (CPU or GPU), or fp16 autocast with a
    gradient scaler (CUDA only; a step whose scaled gradient overflows is skipped on every rank)."""


class HorovodConfig(_Section):
    op: Literal["average", "adasum"] = "average"
    """Gradient reduction: averaging allreduce, or Adasum (power-of-two rank counts)."""
    compression: Literal["none", "fp16"] = "none"
    """Gradient compression on the wire."""
    gradient_predivide_factor: float = Field(1.0, gt=0.0)
    """Divide gradients by this before the sum and by size/factor after (op=average only)."""
    fusion_threshold_mb: Optional[float] = Field(None, ge=0.0, le=65536.0)
    """HOROVOD_FUSION_THRESHOLD in MiB (None: Horovod's default, 64)."""
    cycle_time_ms: Optional[float] = Field(None, gt=0.0, le=60000.0)
    """HOROVOD_CYCLE_TIME in ms (None: 50 with the patched build on CPU, else 2)."""
    cache_capacity: Optional[int] = Field(None, ge=0, le=1_000_000)
    """HOROVOD_CACHE_CAPACITY (None: Horovod's default, 1024)."""
    timeline: Optional[str] = None
    """HOROVOD_TIMELINE: write a Chrome-trace timeline to this file."""
    groups: Optional[int] = Field(None, ge=1, le=1_000_000)
    """DistributedOptimizer(groups=N): allreduce the gradients in N groups, each once all of
    its gradients are ready (1: one grouped allreduce after backward). None: one allreduce per
    gradient as backward produces it (Horovod's default)."""
    wake_on_wait: bool = True
    """HOROVOD_WAKE_ON_WAIT: waiting for an unfinished allreduce wakes Horovod's background
    thread instead of sleeping out its cycle; gradients enqueued during backward still fuse
    (needs the patched build of scripts/install.sh; stock Horovod ignores it)."""
    elastic_commit_steps: int = Field(20, ge=1)
    """Under Horovod elastic (``horovodrun --min-np/--max-np``): commit the training state in
    memory every N steps and at every epoch end; a lost rank rolls the others back to the last
    commit, and added hosts join at the next one."""


class DDPConfig(_Section):
    bucket_cap_mb: float = Field(25.0, gt=0.0)
    """DistributedDataParallel bucket size (torch's default 25)."""
    master_port: int = Field(0, ge=0, le=65535)
    """Rendezvous port on rank 0's host (0: rank 0 picks a free one and tells the others)."""
    comm_hook: Literal["none", "fp16", "powersgd"] = "none"
    """What DDP sends for each gradient bucket: the fp32 gradient (``none``); the gradient cast to
    fp16, half the bytes at ~5e-4 relative rounding (``fp16``); or, after
    ``powersgd_warmup_steps`` plain steps, PowerSGD's rank-r factors of each weight matrix, with
    error feedback (``powersgd``; vectors and small matrices go whole). torch's own hooks; not
    with ``parallel.pipeline_stages`` > 1."""
    powersgd_rank: int = Field(2, ge=1, le=1024)
    """PowerSGD's rank r: an n x m gradient matrix travels as (n + m) x r numbers, or whole when
    that is not at least 2x smaller. Lower is fewer bytes and a coarser gradient."""
    powersgd_warmup_steps: int = Field(10, ge=2)
    """Optimizer steps of plain fp32 allreduce before PowerSGD compresses (torch's
    ``start_powerSGD_iter``; at least 2: DDP rebuilds its buckets after the first step, and
    PowerSGD's memory is kept per bucket). A resume continues the count."""


class LocalConfig(_Section):
    sync_every: int = Field(16, ge=1, le=INT_LIMIT)
    """For ``strategy: local_sgd``: H, optimizer steps each rank takes alone between two
    averagings of the parameters (an epoch's last step always averages)."""
    warmup_steps: int = Field(0, ge=0, le=INT_LIMIT)
    """Fully synchronous steps first (gradients averaged every step), then local steps
    (post-local SGD)."""
    outer: Literal["average", "sgd", "nesterov"] = "average"
    """What an averaging does: take the ranks' mean (local SGD), or treat its difference from
    the last averaged parameters as a gradient for an outer SGD, plain or with Nesterov
    momentum (DiLoCo)."""
    outer_lr: float = Field(0.7, gt=0.0, le=10.0)
    """DiLoCo's outer learning rate (1 with ``outer: sgd`` is plain averaging)."""
    outer_momentum: float = Field(0.9, ge=0.0, lt=1.0)
    """DiLoCo's outer Nesterov momentum (``outer: nesterov``)."""


class FedAvgConfig(_Section):
    clients: int = Field(20, ge=1, le=1_000_000)
    """For ``strategy: fedavg``: K virtual clients, each holding a part of the training set;
    each rank simulates its share of a round's clients one after another."""
    fraction: float = Field(0.5, gt=0.0, le=1.0)
    """C: the share of clients sampled (seeded) to train in each round."""
    local_epochs: int = Field(1, ge=1, le=10_000)
    """E: epochs a sampled client trains over its own data, at ``batch_size``, each round."""
    alpha: Optional[float] = Field(None, gt=0.0)
    """Non-IID clients: each class's samples are dealt to the clients in Dirichlet(alpha)
    proportions (small alpha: few classes per client). None: IID, a seeded even split."""
    mu: float = Field(0.0, ge=0.0)
    """FedProx: a client's loss gains mu/2 * ||w - w_global||^2 (0: plain FedAvg)."""


class ParallelConfig(_Section):
    pipeline_stages: int = Field(1, ge=1, le=1024)
    """Pipeline stages P: the model is cut into P stages of consecutive blocks, one per rank, and
    the ranks form world/P replicas of the pipeline (strategies horovod and ddp)."""
    microbatches: int = Field(1, ge=1, le=4096)
    """Pieces each batch is split into, flowing through the stages one after another: the
    pipeline's bubble is (P-1)/(microbatches+P-1) of a step."""
    schedule: Literal["gpipe", "1f1b"] = "1f1b"
    """Order of the passes on a stage: every forward then every backward (``gpipe``), or one
    forward one backward once the pipe is full (``1f1b``: the same bubble, fewer activations held)."""
    cuts: Optional[list[str]] = None
    """Names of the blocks where stages 1..P-1 begin (default: balanced by parameter count)."""


class PSConfig(_Section):
    num_servers: int = Field(1, ge=1)
    """Ranks that serve parameter shards; the rest are workers."""
    mode: Literal["sync", "async", "ssp"] = "sync"
    """Consistency: synchronous, asynchronous (Downpour), or bounded staleness (SSP)."""
    staleness: int = 2
    """For ``ssp``: no worker runs more than this many steps ahead of the slowest."""
    backup_workers: int = 0
    """For ``sync``: a step proceeds with the first workers-b gradients; late ones are dropped."""
    timeout_s: float = Field(60.0, gt=0.0)
    """A peer silent for this long is declared dead: every rank exits non-zero naming it."""

    @model_validator(mode="after")
    def _check(self) -> "PSConfig":
        if self.staleness < 0:
            raise _FieldError("staleness", f"must be >= 0, got {self.staleness}")
        if self.backup_workers < 0:
            raise _FieldError("backup_workers", f"must be >= 0, got {self.backup_workers}")
        return self


class TrainConfig(_Section):
    strategy: Literal["horovod", "ddp", "ps", "local_sgd", "fedavg", "single"] = "horovod"
    """How gradients are exchanged: Horovod ring-allreduce, torch DDP over gloo, the mpi4py
    parameter server, local SGD / DiLoCo (Horovod averages parameters every ``local.sync_every``
    steps), ``fedavg`` (virtual clients, a weighted mean each round), or ``single``: one process
    without MPI (no exchange)."""
    seed: int = 0
    """Seeds model init, data order and every rank's RNG."""
    epochs: int = Field(10, ge=1)
    """Training epochs."""
    batch_size: int = Field(32, ge=1)
    """Micro-batch size per data-parallel rank."""
    max_steps: int = Field(0, ge=0)
    """Stop after this many optimizer steps in total (0: run all epochs); a checkpoint is
    written at the stop, so a later run with resume=auto continues exactly."""
    run_dir: str = "runs/default"
    """Where metrics.jsonl, summary.json and checkpoints go."""
    data: DataConfig = Field(default_factory=DataConfig)
    model: ModelConfig = Field(default_factory=ModelConfig)
    optim: OptimConfig = Field(default_factory=OptimConfig)
    horovod: HorovodConfig = Field(default_factory=HorovodConfig)
    ddp: DDPConfig = Field(default_factory=DDPConfig)
    ps: PSConfig = Field(default_factory=PSConfig)
    parallel: ParallelConfig = Field(default_factory=ParallelConfig)
    local: LocalConfig = Field(default_factory=LocalConfig)
    fedavg: FedAvgConfig = Field(default_factory=FedAvgConfig)
    checkpoint: CheckpointConfig = Field(default_factory=CheckpointConfig)
    runtime: RuntimeConfig = Field(default_factory=RuntimeConfig)

    @model_validator(mode="after")
    def _check(self) -> "TrainConfig":
        # what one strategy cannot run is that strategy's check() (strategies/), run before
        # any collective; here only what no strategy can
        if self.horovod.op == "adasum" and self.horovod.gradient_predivide_factor != 1.0:
            raise _FieldError("horovod.gradient_predivide_factor", "must be 1.0 with horovod.op=adasum")
        if self.optim.precision == "fp16":
            if self.horovod.op == "adasum":
                raise _FieldError("optim.precision", "fp16 is not supported with horovod.op=adasum; use bf16")
            if not _cuda_available():
                raise _FieldError("optim.precision", "fp16 needs a CUDA GPU (none here); use bf16 on CPU")
        if self.parallel.pipeline_stages > 1 and self.model.sync_batchnorm:
            raise _FieldError("model.sync_batchnorm", "not supported with parallel.pipeline_stages > 1")
        if self.parallel.cuts is not None and len(self.parallel.cuts) != self.parallel.pipeline_stages - 1:
            raise _FieldError("parallel.cuts", f"{self.parallel.pipeline_stages} stages need "
                                               f"{self.parallel.pipeline_stages - 1} cut points")
        if self.horovod.op == "adasum" and self.optim.lr_scaling == "linear":
            raise _FieldError("optim.lr_scaling",
                             "Adasum on CPU takes no linear lr scaling: use none (or sqrt)")
        return self

    def to_dict(self) -> dict[str, Any]:
        return self.model_dump(mode="python")


def _cuda_available() -> bool:
    """Imports torch only when asked (fp16), so loading a config stays light."""
    import torch

    return torch.cuda.is_available()
