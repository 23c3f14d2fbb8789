"""Runs over several processes and machines with ``torch.distributed`` (what ``torchrun`` starts).

vitlens does not launch processes itself: ``torchrun --nproc-per-node N -m vitlens explain ...``
starts N copies of the command with ``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK`` and a rendezvous in
their environment; :func:`join` turns that into a process group (gloo on CPU, NCCL on CUDA). A
program that already called ``torch.distributed.init_process_group`` is used as it is.

The dataset runner needs only a handful of collective steps, gathered in :class:`Group`: the main
rank prepares the run directory and tells the others whether it could (so a refused ``--out`` is one
line on every rank, not a hang), every rank explains its share of the batches, and at the end the
per-image records and counts are gathered so that one rank writes the manifest, the tables and the
report from all of them. A one-process run is the same code with a :class:`Group` of one.
"""

from __future__ import annotations

import os
from contextlib import contextmanager
from dataclasses import dataclass

import torch

from vitlens.errors import UsageError, VitlensError

__all__ = ["Group", "current", "exit_process", "join", "joined", "leave", "local_device"]

# set by leave(): this process created and destroyed a process group (see exit_process)
_left_a_group = False


@dataclass
class Group:
    """The processes of one run: this one is ``rank`` of ``world_size``.

    ``owned`` is True when vitlens created the process group (and so destroys it in :func:`leave`).
    """

    rank: int = 0
    world_size: int = 1
    owned: bool = False

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1

    def share(self, items: list) -> list:
        """This rank's share of ``items``: every ``world_size``-th one starting at ``rank``.

        Deterministic and independent of timing, so a rerun with the same world size gives every
        rank the same items; the runner shares whole batches, so a batch holds the same images
        whatever the world size.
        """
        return items[self.rank::self.world_size] if self.distributed else list(items)

    def gather(self, value) -> list:
        """Every rank's ``value`` (any picklable object), in rank order, on every rank."""
        if not self.distributed:
            return [value]
        values: list = [None] * self.world_size
        torch.distributed.all_gather_object(values, value)
        return values

    def gather_to_main(self, value) -> list | None:
        """Every rank's ``value`` in rank order on the main rank (None on the others)."""
        if not self.distributed:
            return [value]
        values: list | None = [None] * self.world_size if self.is_main else None
        torch.distributed.gather_object(value, values, dst=0)
        return values

    def from_main(self, value):
        """The main rank's ``value`` on every rank."""
        if not self.distributed:
            return value
        box = [value]
        torch.distributed.broadcast_object_list(box, src=0)
        return box[0]

    def run_on_main(self, step):
        """Call ``step()`` on the main rank only; every rank returns its result or raises its error.

        A vitlens error on the main rank (say, ``--out`` holds another run) is raised on every
        rank with the same one-line message, instead of leaving the others waiting for it.
        """
        outcome = None
        if self.is_main:
            try:
                outcome = ("ok", step())
            except VitlensError as error:
                outcome = ("error", error)
                if not self.distributed:
                    raise
        outcome = self.from_main(outcome)
        if outcome[0] == "error":
            raise outcome[1]
        return outcome[1]


def _launched_by_torchrun() -> bool:
    try:
        return int(os.environ.get("WORLD_SIZE", "1")) > 1
    except ValueError:
        return False


def current() -> Group:
    """The group of this process: the initialised ``torch.distributed`` group, else one process."""
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        return Group(rank=torch.distributed.get_rank(), world_size=torch.distributed.get_world_size())
    return Group()


def local_device(device: torch.device) -> torch.device:
    """A plain ``cuda`` device becomes this process's GPU (``LOCAL_RANK``) under torchrun."""
    if device.type == "cuda" and device.index is None and _launched_by_torchrun():
        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
    return device


def join(device: torch.device) -> Group:
    """Join the process group torchrun prepared (gloo for CPU, NCCL for CUDA); one process otherwise."""
    group = current()
    if group.distributed or not _launched_by_torchrun():
        return group
    if not torch.distributed.is_available():
        raise UsageError("this torch build has no torch.distributed: run without torchrun")
    if device.type == "cuda":
        torch.cuda.set_device(device)
        backend = "nccl"
    else:
        backend = "gloo"
    try:
        torch.distributed.init_process_group(backend=backend)
    except (RuntimeError, ValueError) as error:
        reason = " ".join(str(error).split())[:300]
        raise UsageError(f"cannot join the torchrun process group ({backend}): {reason}") from None
    group = current()
    group.owned = True
    return group


def leave(group: Group, failed: bool = False) -> None:
    """Destroy the process group if :func:`join` created it.

    After a finished run every rank first waits for the others: a rank that tears down its
    connections while another still talks to it makes gloo abort. A rank that failed does not wait
    (the others may be in the middle of their batches, in no collective call that would match): it
    leaves at once, and torchrun stops the other ranks when it exits with an error.
    """
    global _left_a_group
    if group.owned and torch.distributed.is_initialized():
        try:
            if not failed:
                torch.distributed.barrier()
        finally:
            torch.distributed.destroy_process_group()
            _left_a_group = True


@contextmanager
def joined(device: torch.device):
    """``with joined(device) as group:`` join the torchrun group (:func:`join`), leave it on the way out."""
    group = join(device)
    try:
        yield group
    except BaseException:
        leave(group, failed=True)
        raise
    leave(group)


def exit_process(code: int) -> None:
    """End the command with ``code``. After a torchrun run, skip the interpreter's C++ teardown.

    With the c10d rendezvous (``--standalone``, multi-node) a worker that destroyed its process
    group still aborts now and then while C++ static objects are destroyed after Python's own
    shutdown ("terminate called without an active exception", exit -6, seen in 1 of 5 runs of
    torch 2.14 on CPU), which torchrun reports as a failed run although every file was written.
    Everything is flushed and closed by then, so such a process leaves with ``os._exit``.
    """
    import sys

    if not _left_a_group:
        sys.exit(code)
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)
