"""Atomic, weights-only checkpoints in ``run_dir/checkpoints``.

Write: serialize to memory, write a temp file in the same directory, fsync, rename over the
final name, fsync the directory; then prune to the newest ``keep``. A crash at any point leaves
either the old set or the new file complete, never a torn file under a final name.
Read: ``torch.load(weights_only=True)`` only (no arbitrary unpickling); a file that fails to
load or lacks the required keys is skipped in favour of the next newest.
"""
from __future__ import annotations

import io
import os
import re
from pathlib import Path
from typing import Any, Optional

import torch

from .strategies.base import torch_load_bytes

FORMAT = 1
REQUIRED = ("format", "model", "optimizer", "scheduler", "step", "epoch", "batch_in_epoch", "rng", "config")
_NAME = re.compile(r"^ckpt-step(\d{9})\.pt$")


class Checkpointer:
    """Local-filesystem storage. Only rank 0 should call ``save``; any rank may read."""

    def __init__(self, directory: str | os.PathLike, keep: int = 3) -> None:
        self.dir = Path(directory)
        self.keep = keep

    def path_for(self, step: int) -> Path:
        return self.dir / f"ckpt-step{step:09d}.pt"

    def save(self, payload: dict[str, Any]) -> Path:
        self.dir.mkdir(parents=True, exist_ok=True)
        payload = {"format": FORMAT, **payload}
        buf = io.BytesIO()
        torch.save(payload, buf)
        final = self.path_for(int(payload["step"]))
        tmp = final.with_name(f".{final.name}.tmp-{os.getpid()}")
        with open(tmp, "wb") as f:
            f.write(buf.getbuffer())
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

    def newest_valid(self) -> Optional[tuple[Path, bytes]]:
        """(path, bytes) of the newest checkpoint that loads and has every required key."""
        for path in self.list():
            data = path.read_bytes()
            try:
                payload = torch_load_bytes(data)
            except Exception:
                continue
            if isinstance(payload, dict) and all(k in payload for k in REQUIRED) and payload["format"] == FORMAT:
                return path, data
        return None


def load(path: str | os.PathLike) -> dict[str, Any]:
    """Weights-only load of one checkpoint file."""
    return torch_load_bytes(Path(path).read_bytes())
