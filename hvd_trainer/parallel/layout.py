"""Which rank holds which stage of which replica.

A pipeline's stages are consecutive ranks (``rank = replica * stages + stage``), so
``mpirun --map-by slot`` (or ``ppr:N:node``), which fills a host before the next, keeps a
pipeline's activation traffic inside a host whenever a host has at least ``stages`` slots;
the replicas of one stage, which exchange gradients once per step, span the hosts.
"""
from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Layout:
    world: int
    stages: int = 1

    def __post_init__(self) -> None:
        if self.stages < 1 or self.world % self.stages:
            raise ValueError(f"{self.stages} pipeline stages do not divide {self.world} ranks")

    @property
    def replicas(self) -> int:
        return self.world // self.stages

    def stage_of(self, rank: int) -> int:
        return rank % self.stages

    def replica_of(self, rank: int) -> int:
        return rank // self.stages

    def rank_of(self, replica: int, stage: int) -> int:
        return replica * self.stages + stage

    def pipeline(self, replica: int) -> list[int]:
        """The ranks of one replica's stages, first to last."""
        return [self.rank_of(replica, s) for s in range(self.stages)]

    def stage_group(self, stage: int) -> list[int]:
        """The ranks holding ``stage``, one per replica: they exchange its gradients."""
        return [self.rank_of(d, stage) for d in range(self.replicas)]

    def describe(self, hosts: list[str]) -> list[str]:
        """One line per replica: which rank holds which stage on which host."""
        return [f"replica {d}: " + "  ".join(f"stage {s}=rank {r} ({hosts[r]})"
                                             for s, r in enumerate(self.pipeline(d)))
                for d in range(self.replicas)]
