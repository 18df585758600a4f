"""A corpus of odd and malformed models and data files, generated in code (nothing large committed).

``python -m tests.corpus.build DIR`` writes every case into ``DIR/<case>/``; ``tests/test_corpus.py``
runs each one through ``qc`` and holds it to its expectation.
"""
