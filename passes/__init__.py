"""Built-in passes, one module per pass, named as the pass (``fold_batchnorm.py`` is ``fold-batchnorm``).

Importing this package does not import the passes; `qcompiler.registry` loads them on first use.
"""
