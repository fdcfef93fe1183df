"""Run the LungNLB module's self-test (Slicer needs its main window: the test uses the Red slice view) and exit with its result (0 passed, 1 failed).

    Slicer --additional-module-paths slicer_extension/LungNLB \
        --python-script slicer_extension/LungNLB/Testing/run_selftest.py

The test runs against the in-process fake server of LungNLBLib.testing: no live server, no weights.
"""

import traceback

import slicer

try:
    import LungNLB

    LungNLB.LungNLBTest().runTest()
except Exception:
    traceback.print_exc()
    slicer.util.exit(1)
else:
    print("LungNLBTest passed")
    slicer.util.exit(0)
