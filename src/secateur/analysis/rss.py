"""Resident memory of this process from /proc (Linux): the figure benchmarks compare between approaches.

Why not tracemalloc or torch's profiler: tensors live outside Python's allocator, and what a user's machine
runs out of is resident memory, allocator caches included.
"""

from __future__ import annotations


def status_mib(field: str = "VmRSS") -> float:
    """A memory field of /proc/self/status in MiB (``VmRSS`` now, ``VmHWM`` the peak since start or reset).

    Raises RuntimeError if the field is missing (e.g. not Linux), OSError if /proc cannot be read.
    """
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1]) / 1024.0  # kB
    raise RuntimeError(f"{field} not in /proc/self/status")


def reset_peak_rss() -> bool:
    """Reset this process's peak-RSS mark (VmHWM) by writing 5 to /proc/self/clear_refs (Linux >= 4.0).

    Returns False when that is not possible (then VmHWM keeps the peak since the process started).
    """
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


__all__ = ["reset_peak_rss", "status_mib"]
