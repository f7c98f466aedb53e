"""What the operating system says about this machine and this process (Linux's /proc, libc).

Each reader fails softly where the OS has no such file (None, False or a fallback), except
`status_kib`, whose callers check `reset_peak_rss` first.
"""

from __future__ import annotations

import ctypes
import platform
import resource
from typing import Optional


def mem_available_bytes() -> Optional[float]:
    """/proc/meminfo's MemAvailable: what can be allocated without swapping (None if unknown)."""
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024.0
    except OSError:
        pass
    return None


def cpu_model() -> str:
    """/proc/cpuinfo's model name with its CPU family and model (VMs often name only "AMD EPYC":
    family 23 is Zen 1/2, 25 Zen 3/4, 26 Zen 5), or what `platform` knows."""
    fields = {}
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                key, _, value = line.partition(":")
                if not line.strip():
                    break  # the first CPU's block is enough
                fields.setdefault(key.strip(), value.strip())
    except OSError:
        pass
    if "model name" in fields:
        family = f" (family {fields['cpu family']}, model {fields['model']})" if "cpu family" in fields else ""
        return fields["model name"] + family
    return platform.processor() or platform.machine()


def status_kib(field_name: str) -> int:
    """A field of /proc/self/status in KiB, e.g. VmRSS (resident now), VmHWM (its peak)."""
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field_name + ":"):
                return int(line.split()[1])
    raise OSError(f"{field_name} not in /proc/self/status")


def reset_peak_rss() -> bool:
    """Sets VmHWM back to VmRSS (/proc/self/clear_refs ← 5); False where that is refused."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def max_rss_bytes() -> int:
    """This process's peak resident size (ru_maxrss, in KiB on Linux); it cannot be reset."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def malloc_trim() -> None:
    """Asks glibc to return freed heap memory to the OS, so that the RSS drops to what is in use."""
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass
