"""``python -m services.engine.kernels``: build the CPU kernels now (exit 1 if they cannot load)."""

import sys

from services.engine.kernels import load_cpu_ops

if __name__ == "__main__":
    ops = load_cpu_ops()
    print("tandem CPU kernels:", "ready" if ops is not None else "unavailable (torch ops will run)")
    sys.exit(0 if ops is not None else 1)
