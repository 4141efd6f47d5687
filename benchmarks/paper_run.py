"""Moved to :mod:`benchmarks.speed.paper_run`; this name stays because the GPU scripts and tests run it."""

import sys

from benchmarks.speed import paper_run as _module

if __name__ == "__main__":
    _module.main()
else:
    sys.modules[__name__] = _module
