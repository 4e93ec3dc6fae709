"""A simulator that fails on purpose, for the fault-injection tests of rewards.simulator.Command.

Usage: ``python -S fault_simulator.py IN.npy OUT.npy``. Standard library only (no numpy import: calls
start in ~20 ms). Each sample is (code, value); a good sample's reward is its value. Codes:

    0 good      1 crash (exit 1)       2 hang, with a grandchild    3 garbage output
    4 wrong output shape               5 NaN for this sample        6 SIGKILL itself
    7 good after 0.2 s                 8 crash on its first call only (flaky)    9 no output file

Every call appends one line "codes..." to $FAULT_LOG (when set); a hanging call writes its grandchild's
pid to $FAULT_DIR/grandchild-<pid>; flaky samples remember their first call in $FAULT_DIR.
"""

from __future__ import annotations

import ast
import os
import signal
import struct
import subprocess
import sys
import time


def read_npy(path: str) -> list[list[float]]:
    """Rows of a C-order little-endian float64 2-D .npy file."""
    with open(path, "rb") as f:
        data = f.read()
    assert data[:6] == b"\x93NUMPY", "not a .npy file"
    if data[6] == 1:
        (size,), start = struct.unpack("<H", data[8:10]), 10
    else:
        (size,), start = struct.unpack("<I", data[8:12]), 12
    header = ast.literal_eval(data[start : start + size].decode("latin1"))
    assert header["descr"] == "<f8" and not header["fortran_order"], header
    rows, cols = header["shape"]
    flat = struct.unpack(f"<{rows * cols}d", data[start + size : start + size + 8 * rows * cols])
    return [list(flat[r * cols : (r + 1) * cols]) for r in range(rows)]


def write_npy(path: str, values: list[float]) -> None:
    """A 1-D float64 .npy file (format version 1.0)."""
    header = "{'descr': '<f8', 'fortran_order': False, 'shape': (%d,), }" % len(values)
    header += " " * (-(10 + len(header) + 1) % 64) + "\n"
    with open(path, "wb") as f:
        f.write(b"\x93NUMPY\x01\x00" + struct.pack("<H", len(header)) + header.encode("latin1"))
        f.write(struct.pack(f"<{len(values)}d", *values))


def main(input_path: str, output_path: str) -> int:
    rows = read_npy(input_path)
    codes = [int(round(r[0])) for r in rows]
    log, state = os.environ.get("FAULT_LOG"), os.environ.get("FAULT_DIR", "")
    if log:
        with open(log, "a") as f:
            f.write(" ".join(map(str, codes)) + "\n")
    if 6 in codes:
        os.kill(os.getpid(), signal.SIGKILL)
    if 2 in codes:
        child = subprocess.Popen([sys.executable, "-S", "-c", "import time; time.sleep(60)"])
        with open(os.path.join(state, f"grandchild-{child.pid}"), "w") as f:
            f.write(str(child.pid))
        time.sleep(60)
    if 1 in codes:
        print("fault_simulator: crash", file=sys.stderr)
        return 1
    flaky = [os.path.join(state, f"flaky-{r[1]!r}") for r, c in zip(rows, codes) if c == 8]
    fresh = [p for p in flaky if not os.path.exists(p)]
    for p in fresh:
        open(p, "w").close()
    if fresh:
        return 1
    if 3 in codes:
        with open(output_path, "wb") as f:
            f.write(b"this is not an array")
        return 0
    if 9 in codes:
        return 0
    if 7 in codes:
        time.sleep(0.2)
    values = [float("nan") if c == 5 else r[1] for r, c in zip(rows, codes)]
    write_npy(output_path, values + [0.0] if 4 in codes else values)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1], sys.argv[2]))
