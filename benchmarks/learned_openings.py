"""Moved to :mod:`benchmarks.quality.learned_openings`; this name stays because the GPU scripts and tests run it."""

import sys

from benchmarks.quality import learned_openings as _module

if __name__ == "__main__":
    _module.main()
else:
    sys.modules[__name__] = _module
