"""Run the LungNLB module's self-test (Slicer needs its main window: the test uses the Red slice view) and exit with its result (0 passed, 1 failed).

    LUNGNLB_SERVER_URL=http://127.0.0.1:8000 Slicer \
        --additional-module-paths slicer_extension/LungNLB \
        --python-script slicer_extension/LungNLB/Testing/run_selftest.py
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
