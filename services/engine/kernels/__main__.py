"""``python -m services.engine.kernels``: build every kernel variant this CPU runs, now (exit 1 if
none loads). The variant the engine will pick is listed first."""

import sys

from services.engine.kernels import dispatch_report, load_cpu_ops
from services.engine.kernels.cpu_features import cpu_features
from services.engine.kernels.variants import runnable_variants

if __name__ == "__main__":
    features = cpu_features()
    loaded = 0
    for variant in runnable_variants(features):
        ops = load_cpu_ops(variant.name)
        print(dispatch_report(ops, features) if ops is not None else f"CPU kernels {variant.name}: did not build")
        loaded += ops is not None
    if not loaded:
        print(f"tandem CPU kernels: unavailable on {features.describe()} (torch ops will run)")
    sys.exit(0 if loaded else 1)
