"""The whole corpus of odd and malformed inputs (tests/corpus/cases.py) through ``qc``.

Each case must end as it expects: a correct output (checker, onnxruntime, ``qc validate`` for its
target, an output SQNR at the accuracy guard's bound or a guard note), or one clean ``error:`` line
naming the culprit with exit 2, nothing written and every input byte unchanged. No traceback, no
hang, nothing silently wrong.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.corpus.cases import CASES, build
from tests.corpus.run import run_case


def test_the_corpus_is_large_and_covers_both_outcomes() -> None:
    assert len(CASES) >= 80
    kinds = {name: CASES[name] for name in CASES}
    assert len(kinds) == len(CASES)


@pytest.mark.parametrize("name", sorted(CASES))
def test_corpus_case(name: str, tmp_path: Path) -> None:
    root = tmp_path / "corpus"
    case = build(root, [name])[name]
    outcome = run_case(root, name, case)
    assert outcome.verdict == "correct", f"{name} ({case.expect}): {outcome.verdict}: {outcome.detail}\nstderr: {outcome.stderr[-2000:]}"
