"""How busy the machine was while a worker ran: on a shared machine other users' load
slows a multi-threaded worker far more than its share (torch's threads wait for each
other at every op), so the bench records it beside every timing."""

import contextlib
import os
import resource
import time


def own_cpu_seconds() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def machine_busy_seconds():
    """CPU seconds the whole machine has been busy since boot (Linux; None
    elsewhere)."""
    try:
        with open("/proc/stat") as stat:
            ticks = [int(v) for v in stat.readline().split()[1:9]]
    except (OSError, ValueError):
        return None
    idle = ticks[3] + ticks[4]  # idle, iowait; the rest is busy, a hypervisor's steal too
    return (sum(ticks) - idle) / os.sysconf("SC_CLK_TCK")


def children_cpu_seconds() -> float:
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


@contextlib.contextmanager
def interference():
    """Fills in the block's wall time and the CPU seconds that processes other than
    this one and its children took meanwhile (steal time included)."""
    load = {}
    busy, tic = machine_busy_seconds(), time.perf_counter()
    ours = children_cpu_seconds() + own_cpu_seconds()
    yield load
    load["wall_s"] = time.perf_counter() - tic
    if busy is not None:
        ours = children_cpu_seconds() + own_cpu_seconds() - ours
        load["others_cpu_s"] = max(0.0, machine_busy_seconds() - busy - ours)
