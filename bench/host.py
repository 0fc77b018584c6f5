"""What the benches say about their host: speed figures depend on the CPU's vector extensions."""

import os
from pathlib import Path


def describe_cpu(no_avx512: bool = False) -> str:
    """The CPU model and which vector extensions it has (Linux /proc/cpuinfo), and whether AVX-512 was hidden."""
    try:
        info = Path("/proc/cpuinfo").read_text()
    except OSError:
        return "CPU: unknown (no /proc/cpuinfo)"
    fields = {}
    for line in info.splitlines():  # the first processor's entries
        key, _, value = line.partition(":")
        fields.setdefault(key.strip(), value.strip())
    flags = set(fields.get("flags", "").split())
    vector = [flag for flag in ("avx", "avx2", "fma", "avx512f", "avx512bw", "avx512vl") if flag in flags]
    hidden = "; AVX-512 hidden from NumPy, PyTorch, MKL and oneDNN (--no_avx512)" if no_avx512 else ""
    return f"CPU: {fields.get('model name', '?')}, {os.cpu_count()} CPUs, {' '.join(vector)}{hidden}"
