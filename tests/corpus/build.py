"""``python -m tests.corpus.build DIR [NAME ...]``: write the corpus (or the named cases) into DIR.

Each case lands in ``DIR/<name>/`` beside ``DIR/manifest.json``, which gives the ``qc`` arguments
to run it with (from inside its folder) and what it must do.
"""

from __future__ import annotations

import json
import sys
from dataclasses import asdict
from pathlib import Path

from tests.corpus.cases import CASES, build


def main(argv: list[str]) -> int:
    if not argv:
        print(__doc__.strip().splitlines()[0], file=sys.stderr)
        return 2
    root, names = Path(argv[0]), argv[1:] or list(CASES)
    cases = build(root, names)
    (root / "manifest.json").write_text(json.dumps({name: asdict(case) for name, case in cases.items()}, indent=1, ensure_ascii=False) + "\n")
    print(f"wrote {len(cases)} cases to {root}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
