"""The processes of a command started by ``accelerate launch`` (or torchrun), for work that is split, not
trained: evaluation and sampling draw their share of the batches on every process, and the main process
gathers the results, scores and writes.

:func:`current_processes` joins accelerate's process group when the launcher set ``WORLD_SIZE > 1`` (on
CPUs a gloo group, as training does; see :mod:`diffdistill.trainers.loop`) and is a single process
otherwise, so code written against :class:`Processes` runs unchanged either way.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any, Sequence

import torch


@dataclass(frozen=True)
class Processes:
    """This process's ``rank`` among ``world`` processes, and the device it should compute on."""

    rank: int = 0
    world: int = 1
    device: str | None = None

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def shard(self) -> tuple[int, int]:
        return self.rank, self.world

    def barrier(self) -> None:
        if self.world > 1:
            torch.distributed.barrier()

    def gather(self, rows: torch.Tensor, counts: Sequence[int]) -> torch.Tensor:
        """Every process's ``rows`` (``counts[r]`` of them on process r, same trailing shape and dtype),
        concatenated in rank order, on every process (CPU)."""
        if self.world == 1:
            return rows.cpu()
        longest = max(counts)
        padded = torch.zeros((longest, *rows.shape[1:]), dtype=rows.dtype, device=self._comm_device)
        padded[:len(rows)] = rows.to(self._comm_device)
        parts = [torch.empty_like(padded) for _ in range(self.world)]
        torch.distributed.all_gather(parts, padded)
        return torch.cat([p[:n].cpu() for p, n in zip(parts, counts)])

    def broadcast(self, obj: Any) -> Any:
        """The main process's ``obj`` on every process (pickled between this run's own processes)."""
        if self.world == 1:
            return obj
        box = [obj if self.is_main else None]
        torch.distributed.broadcast_object_list(box, src=0, device=self._comm_device)
        return box[0]

    @property
    def _comm_device(self) -> torch.device:
        return torch.device("cuda", torch.cuda.current_device()) if torch.distributed.get_backend() == "nccl" \
            else torch.device("cpu")


def launched_processes() -> int:
    """How many processes the launcher (``accelerate launch``, torchrun) started; 1 without one."""
    return int(os.environ.get("WORLD_SIZE", "1"))


def cpu_process_group() -> bool:
    """Whether accelerate must be told ``cpu=True``: several processes and no CUDA. accelerate forms a gloo
    group on CPUs only when told so; a single process keeps accelerate's own device choice (e.g. MPS)."""
    return launched_processes() > 1 and not torch.cuda.is_available()


def current_processes() -> Processes:
    """The processes this command runs as (see the module docstring)."""
    if launched_processes() <= 1:
        return Processes()
    from accelerate import PartialState

    state = PartialState(cpu=cpu_process_group())
    return Processes(state.process_index, state.num_processes, str(state.device))


def leave_process_group() -> None:
    """Wait for every process, then tear the launcher's process group down, once a command has finished.

    Left to interpreter exit, the group's communication threads can be destroyed while still running (gloo:
    ``terminate called without an active exception``, a SIGABRT after the work itself succeeded)."""
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        torch.distributed.barrier()
        torch.distributed.destroy_process_group()
