"""Atomic, checksummed checkpoints in ``run_dir/checkpoints``, and what one must hold.

Write: serialize to memory, write a temp file in the same directory, fsync, rename over the
final name, fsync the directory; then prune to the newest ``keep``. A crash at any point leaves
either the old set or the new file complete, never a torn file under a final name.
Every file starts with a one-line header carrying the SHA-256 of what follows, so flipped or
truncated bytes are found before anything is loaded (a corrupt tensor would otherwise load
and train on in silence).
Read: ``torch.load(weights_only=True)`` only (tensors and plain containers, no arbitrary
unpickling). A file whose checksum does
not match, that fails to load or does not match :data:`SCHEMA` is skipped in favour of the next newest, and the skip is
reported with the file and the reason; when files exist but none is usable the caller is told,
so a damaged run never restarts from step 0 in silence.

:data:`SCHEMA` is the one definition of a checkpoint: ``TrainState.state_dict()`` writes exactly
these keys and :func:`validate` checks them.
"""
from __future__ import annotations

import hashlib
import io
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

import torch

FORMAT = 1
# key -> type of its value. "model"/"optimizer" come from the strategy (a parameter server's
# optimizer state is its servers' shards), the rest from TrainState.
SCHEMA: dict[str, type] = {
    "format": int,
    "model": dict,            # the whole unwrapped model's state_dict (rank 0's BatchNorm buffers)
    "optimizer": dict,        # the optimizer's state_dict; the servers' shards for strategy=ps; per
                              # stage under pipeline stages ({"pipeline_stages": P, "stages": [...]})
                              # with ddp.comm_hook=powersgd also "ddp_powersgd": every rank's PowerSGD
                              # state (torch's optimizers ignore the extra key)
    "scheduler": dict,        # LambdaLR state (the step count the lr schedule is at)
    "step": int,              # optimizer steps taken
    "epoch": int,             # completed epochs
    "batch_in_epoch": int,    # micro-batches this rank consumed in the current epoch, after epoch_offset
    "epoch_offset": int,      # samples of the epoch trained on before the ranks changed (elastic, resize)
    "rng": list,              # every training rank's random streams, in training-rank order
    "config": dict,           # the run's full config
    "world_size": int,        # ranks of the run that wrote it
    "strategy": str,          # strategy of the run that wrote it
    "precision": dict,        # optim.precision and the fp16 gradient scaler's state ({} otherwise)
}
_NAME = re.compile(r"^ckpt-step(\d{9})\.pt$")
_MAGIC = b"HVDCKPT1 sha256="


class ChecksumError(ValueError):
    pass


def seal(data: bytes) -> bytes:
    """The checkpoint file's bytes: a header with the SHA-256 of ``data``, then ``data``."""
    return _MAGIC + hashlib.sha256(data).hexdigest().encode() + b"\n" + data


def unseal(blob: bytes) -> bytes:
    """The serialized payload inside a file written by :func:`seal`, verified."""
    if not blob.startswith(_MAGIC):
        raise ChecksumError("no checksum header (not written by hvd-trainer, or truncated)")
    end = blob.find(b"\n", len(_MAGIC))
    if end < 0:
        raise ChecksumError("truncated header")
    digest, data = blob[len(_MAGIC):end].decode(errors="replace"), blob[end + 1:]
    if hashlib.sha256(data).hexdigest() != digest:
        raise ChecksumError(f"checksum mismatch ({len(data)} bytes; the file is corrupt or truncated)")
    return data


def torch_load_bytes(data: bytes) -> Any:
    """Weights-only load (no arbitrary unpickling) of checkpoint bytes."""
    return torch.load(io.BytesIO(data), map_location="cpu", weights_only=True)


def validate(payload: Any) -> Optional[str]:
    """Why ``payload`` is not a checkpoint of this format (None when it is)."""
    if not isinstance(payload, dict):
        return f"not a mapping but {type(payload).__name__}"
    missing = [k for k in SCHEMA if k not in payload]
    if missing:
        return f"missing {', '.join(missing)}"
    for key, kind in SCHEMA.items():
        if not isinstance(payload[key], kind) or (kind is int and isinstance(payload[key], bool)):
            return f"{key} is {type(payload[key]).__name__}, expected {kind.__name__}"
    if payload["format"] != FORMAT:
        return f"format {payload['format']}, this version reads {FORMAT}"
    return None


@dataclass
class Found:
    """The outcome of looking for a checkpoint to resume from."""

    path: Optional[Path] = None
    data: Optional[bytes] = None  # the verified serialized payload
    skipped: list[tuple[str, str]] = field(default_factory=list)  # (path, reason), newest first

    @property
    def unusable(self) -> bool:
        """Checkpoints exist, and none of them can be used."""
        return self.data is None and bool(self.skipped)


class Checkpointer:
    """Local-filesystem storage. Only rank 0 should call ``save``; any rank may read."""

    def __init__(self, directory: str | os.PathLike, keep: int = 3) -> None:
        self.dir = Path(directory)
        self.keep = keep

    def path_for(self, step: int) -> Path:
        return self.dir / f"ckpt-step{step:09d}.pt"

    def save(self, payload: dict[str, Any]) -> Path:
        reason = validate(payload)
        if reason:  # a bug in the writer: never put an unreadable file under a final name
            raise ValueError(f"refusing to write an invalid checkpoint: {reason}")
        self.dir.mkdir(parents=True, exist_ok=True)
        buf = io.BytesIO()
        torch.save(payload, buf)
        final = self.path_for(int(payload["step"]))
        tmp = final.with_name(f".{final.name}.tmp-{os.getpid()}")
        with open(tmp, "wb") as f:
            f.write(seal(buf.getvalue()))
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, final)
        dir_fd = os.open(self.dir, os.O_RDONLY)
        try:
            os.fsync(dir_fd)
        finally:
            os.close(dir_fd)
        self._prune()
        return final

    def list(self) -> list[Path]:
        """Checkpoint files, newest step first."""
        if not self.dir.is_dir():
            return []
        found = [p for p in self.dir.iterdir() if _NAME.match(p.name)]
        return sorted(found, key=lambda p: int(_NAME.match(p.name).group(1)), reverse=True)

    def _prune(self) -> None:
        for old in self.list()[self.keep:]:
            old.unlink(missing_ok=True)

    def find(self) -> Found:
        """The newest checkpoint that loads and matches the schema, and every newer one skipped
        on the way with the reason."""
        found = Found()
        for path in self.list():
            try:
                data = unseal(path.read_bytes())
                reason = validate(torch_load_bytes(data))
            except ChecksumError as err:
                reason = str(err)
            except Exception as err:  # noqa: BLE001 - unreadable, or a refused pickle
                reason = f"unreadable ({type(err).__name__}: {str(err).splitlines()[0] if str(err) else ''})"
            if reason is None:
                found.path, found.data = path, data
                return found
            found.skipped.append((str(path), reason))
        return found


def load(path: str | os.PathLike) -> dict[str, Any]:
    """Checksum-verified, safe (``weights_only=True``) load of one checkpoint file."""
    return torch_load_bytes(unseal(Path(path).read_bytes()))


def whole_model(path: str | os.PathLike) -> dict[str, Any]:
    """The whole model's state dict from a checkpoint, for the uncut model on one process; a
    run with pipeline stages writes every stage's part under the whole model's names."""
    return load(path)["model"]


def stages_written(payload: dict[str, Any]) -> int:
    """The pipeline stages of the run that wrote a checkpoint."""
    opt = payload["optimizer"]
    return int(opt["pipeline_stages"]) if isinstance(opt, dict) and "pipeline_stages" in opt else 1
