"""The corpus of odd and malformed inputs (tests/corpus/cases.py) through ``qc``, counted by outcome.

    python bench/corpus.py          # every case; prints one line per case, then the count of each class

Classes: correct (an output that holds up: checker, onnxruntime, ``qc validate`` for its target,
output SQNR at the accuracy guard's bound or a guard note; or one clean error line naming the
culprit, exit 2, nothing written, inputs unchanged), traceback, hang (over 180 s), wrong (anything
else). The bar (issue 17): 0 tracebacks, 0 hangs, 0 wrong. Each case's ``qc`` arguments are in the
manifest ``python -m tests.corpus.build DIR`` writes beside the cases.
"""

from __future__ import annotations

import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

from compare_ort import machine, machine_lines  # noqa: E402

from tests.corpus.run import main  # noqa: E402

if __name__ == "__main__":
    for line in machine_lines(machine(), spinning=False):
        print(line)
    sys.exit(main(sys.argv[1:]))
