"""Moved to :mod:`benchmarks.fidelity.models_doc`; this name stays because the GPU scripts and tests run it."""

import sys

from benchmarks.fidelity import models_doc as _module

if __name__ == "__main__":
    _module.main()
else:
    sys.modules[__name__] = _module
