"""The torchrun side of the engine: whether this process converts alone or a share of a job,
and the job's process group when ucp makes it.

``torchrun_rank(distributed)`` decides once per conversion. ``False``: this process alone,
whatever the environment or process group. ``True``: every process of the job calls ucp; it
joins the caller's process group, or makes one from the torchrun environment. ``None``: a
process group the caller made (of several processes) is refused, since ucp cannot tell
whether the other processes call it too (a guess either way hangs or races); otherwise the
torchrun environment makes a job (``torchrun -m ucp convert``), and its absence means alone.

When ucp makes the group, the processes first answer a roll call at MASTER_ADDR:MASTER_PORT
with a bounded wait (``UCP_RENDEZVOUS_TIMEOUT`` seconds, default 120), so that a process
started alone with a torchrun environment (inherited from a training rank, say) fails with
a clear error instead of waiting forever. Later collectives keep torch's long default
timeout: processes legitimately wait minutes for slower ones' shares.
"""
from __future__ import annotations

import os
import sys
import time
from datetime import timedelta

from ucp.errors import UcpError

#: the environment variable that sets the roll call's wait, in seconds
ROLLCALL_TIMEOUT_ENV = "UCP_RENDEZVOUS_TIMEOUT"
ROLLCALL_TIMEOUT_S = 120.0
_JOINED_KEY, _ALL_JOINED_KEY = "ucp/rollcall/joined", "ucp/rollcall/all-joined"
_ALONE_FIX = "or convert in this process alone with --single-process (Python: distributed=False)"

#: the default process group when ucp made it in this process (a later call with
#: ``distributed=None`` then knows the whole job calls, as it did the first time)
_group_made_by_ucp = None


def torchrun_rank(distributed: bool | None = None) -> tuple[int, int] | None:
    """(rank, world size) when this process converts a share of a job of several processes,
    None when it converts alone; ``distributed`` as in the module docstring. Raises
    ``UcpError`` when it cannot tell, or when the job's processes do not all join in time."""
    if distributed is False:
        return None
    group = _existing_group()
    if group is not None:
        rank, world = group
        if distributed is None and world > 1 and not _made_by_ucp():
            raise UcpError(
                f"a process group of {world} processes is already initialised (this is rank {rank}), "
                "and ucp cannot tell whether the other ranks call it too. Pass distributed=True if every "
                "rank calls it (each converts a share), or distributed=False if this process converts "
                "alone (e.g. under `if rank == 0:`)")
        return group if world > 1 else None
    env = _torchrun_env()
    if env is None:
        if distributed and not _one_process_torchrun():
            raise UcpError("distributed=True, but there is no process group and no torchrun environment "
                           "(WORLD_SIZE > 1, MASTER_ADDR, MASTER_PORT, RANK): start every process with "
                           "torchrun, or call init_process_group first")
        return None
    return _make_group(*env)


def _made_by_ucp() -> bool:
    import torch.distributed as dist

    return _group_made_by_ucp is not None and dist.group.WORLD is _group_made_by_ucp


def _existing_group() -> tuple[int, int] | None:
    """(rank, world size) of the default process group, if any (none unless torch.distributed
    is imported already: ``ucp convert`` runs without torch)."""
    dist = sys.modules.get("torch.distributed")
    if dist is None or not dist.is_available() or not dist.is_initialized():
        return None
    return dist.get_rank(), dist.get_world_size()


def _torchrun_env() -> tuple[str, int, int, int] | None:
    """(MASTER_ADDR, MASTER_PORT, RANK, WORLD_SIZE) of a torchrun job of several processes,
    None when the environment describes none."""
    world = _int_env("WORLD_SIZE", "1")
    if world <= 1 or "MASTER_ADDR" not in os.environ:
        return None
    missing = [k for k in ("RANK", "MASTER_PORT") if k not in os.environ]
    if missing:
        raise UcpError(f"WORLD_SIZE={world} and MASTER_ADDR are set but {' and '.join(missing)} not: start "
                       f"every process with torchrun, {_ALONE_FIX}")
    rank = _int_env("RANK")
    if not 0 <= rank < world:
        raise UcpError(f"RANK={rank} is outside WORLD_SIZE={world}")
    return os.environ["MASTER_ADDR"], _int_env("MASTER_PORT"), rank, world


def _one_process_torchrun() -> bool:
    return "MASTER_ADDR" in os.environ and _int_env("WORLD_SIZE", "1") == 1


def _int_env(name: str, default: str | None = None) -> int:
    raw = os.environ.get(name, default)
    try:
        return int(raw)
    except (TypeError, ValueError):
        raise UcpError(f"{name}={raw!r} is not an integer") from None


def rollcall_timeout() -> float:
    """Seconds the processes of a job wait for each other to join: ``UCP_RENDEZVOUS_TIMEOUT``,
    else ``ROLLCALL_TIMEOUT_S``."""
    raw = os.environ.get(ROLLCALL_TIMEOUT_ENV)
    if raw is None:
        return ROLLCALL_TIMEOUT_S
    try:
        seconds = float(raw)
    except ValueError:
        seconds = 0.0
    if not seconds > 0:
        raise UcpError(f"{ROLLCALL_TIMEOUT_ENV}={raw!r}: expected a number of seconds above 0")
    return seconds


def _make_group(addr: str, port: int, rank: int, world: int) -> tuple[int, int]:
    """Make the default process group (gloo: conversion moves bytes between files, not GPUs)
    once every process of the job has answered the roll call."""
    global _group_made_by_ucp
    import torch.distributed as dist
    from torch.distributed.constants import default_pg_timeout

    wait = rollcall_timeout()
    deadline = time.monotonic() + wait
    store = _open_store(addr, port, rank, world, wait, deadline)
    _roll_call(store, addr, port, rank, world, deadline, wait)
    store.set_timeout(default_pg_timeout)
    dist.init_process_group("gloo", store=store, rank=rank, world_size=world, timeout=default_pg_timeout)
    _group_made_by_ucp = dist.group.WORLD
    return rank, world


def _open_store(addr: str, port: int, rank: int, world: int, wait: float, deadline: float):
    """The job's key-value store: process 0 hosts it, unless torchrun's agent already does
    (``TORCHELASTIC_USE_AGENT_STORE``, as torch's own env:// rendezvous decides)."""
    import torch.distributed as dist

    hosts = rank == 0 and os.environ.get("TORCHELASTIC_USE_AGENT_STORE") != "True"
    where = f"{addr}:{port}"
    unreachable = UcpError(
        f"process {rank} of {world} could not reach the job's rendezvous at {where} (MASTER_ADDR:MASTER_PORT) "
        f"within {wait:g} s: is process 0 running? Start every process with torchrun, {_ALONE_FIX}. "
        f"{ROLLCALL_TIMEOUT_ENV} sets the wait in seconds")
    # TCPStore's own connect retries its whole timeout twice over: wait here, up to the deadline
    if not hosts and not _listening(addr, port, deadline):
        raise unreachable
    try:
        return dist.TCPStore(addr, port, world, is_master=hosts, wait_for_workers=False,
                             timeout=timedelta(seconds=max(deadline - time.monotonic(), 1.0)))
    except dist.DistError as e:
        reason = str(e).splitlines()[0] if str(e) else type(e).__name__
        if hosts and "EADDRINUSE" in reason:
            raise UcpError(f"{where} is already in use, so process 0 cannot host the job's rendezvous there "
                           "(MASTER_ADDR:MASTER_PORT; another job holds it, or this process inherited a "
                           f"training job's environment): give the job a free MASTER_PORT, {_ALONE_FIX}") from None
        if hosts:
            raise UcpError(f"process 0 cannot host the job's rendezvous at {where} (MASTER_ADDR:MASTER_PORT): "
                           f"{reason}; {_ALONE_FIX}") from None
        raise unreachable from None


def _listening(addr: str, port: int, deadline: float) -> bool:
    """Whether something accepts connections at ``addr:port`` before ``deadline`` (tried again
    every 0.1 s while refused)."""
    import socket

    while True:
        try:
            with socket.create_connection((addr, port), timeout=max(min(deadline - time.monotonic(), 5.0), 0.1)):
                return True
        except OSError:
            if time.monotonic() >= deadline:
                return False
            time.sleep(0.1)


def _roll_call(store, addr: str, port: int, rank: int, world: int, deadline: float, wait: float) -> None:
    """Return once all ``world`` processes have joined; raise ``UcpError`` at ``deadline``."""
    import torch.distributed as dist

    try:
        if store.add(_JOINED_KEY, 1) >= world:
            store.set(_ALL_JOINED_KEY, "1")
        if _wait_in_slices(store, deadline):
            return
    except dist.DistError:
        pass
    try:
        joined = f"only {store.add(_JOINED_KEY, 0)} of the {world} processes"
    except dist.DistError:   # process 0, which hosts the store, has already given up
        joined = f"not all {world} processes"
    raise UcpError(f"{joined} (WORLD_SIZE={world}) joined the job's rendezvous at {addr}:{port} "
                   f"(MASTER_ADDR:MASTER_PORT) within {wait:g} s (this is process {rank}): the torchrun "
                   "environment says every process of the job converts a share. Start every process with "
                   f"torchrun (torchrun --nproc_per_node {world} -m ucp ...), {_ALONE_FIX}. "
                   f"{ROLLCALL_TIMEOUT_ENV} sets the wait in seconds")


def _wait_in_slices(store, deadline: float, slice_s: float = 1.0) -> bool:
    """Wait for every process to join, a second at a time: a wait inside the store does not return
    to Python, so Ctrl-C on a process whose partners never come would otherwise wait out the whole
    deadline. False at the deadline, or at once where the store fails other than by timing out."""
    import torch.distributed as dist

    while True:
        wait = max(min(deadline - time.monotonic(), slice_s), 0.001)
        began = time.monotonic()
        try:
            store.wait([_ALL_JOINED_KEY], timedelta(seconds=wait))
            return True
        except dist.DistError:
            if time.monotonic() >= deadline or time.monotonic() - began < wait / 2:
                return False


def agree(failure: str | None, what: str) -> None:
    """Collective: every process of the job raises the same ``UcpError`` listing every
    process's failure (``failure``: this one's, or None), so none goes on alone."""
    import torch.distributed as dist

    from ucp.format.distributed import partners

    statuses: list = [None] * dist.get_world_size()
    with partners(f"{what} failed"):
        dist.all_gather_object(statuses, None if failure is None else f"rank {dist.get_rank()}: {failure}")
    failed = [s for s in statuses if s]
    if failed:
        raise UcpError(f"{what} failed:\n  " + "\n  ".join(failed))


def failure_text(e: BaseException) -> str:
    """One line for another process to read: the exception's type and message, or that this
    process was interrupted (torch's zip writer turns the interrupt into "unexpected pos", which
    the others read as a full disk)."""
    from ucp import errors

    if errors.interrupted_by is not None:
        import signal

        return f"interrupted ({signal.Signals(errors.interrupted_by).name})"
    return f"{type(e).__name__}: {e}"
