"""Moved to :mod:`benchmarks.quality.keep_refusal`; this name stays because the GPU scripts and tests run it."""

import sys

from benchmarks.quality import keep_refusal as _module

if __name__ == "__main__":
    _module.main()
else:
    sys.modules[__name__] = _module
