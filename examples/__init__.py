"""Examples of flora_optax, and the code the benchmarks share with them.

A package so that one copy of the shared code (the GPTs of ``gpt.py`` and
``model.py``, the text of ``data.py``, the byte counts of ``memory.py``, the
XLA:CPU work-around of ``xla_cpu.py``) serves the examples and
``benchmarks/`` through ordinary imports (``from examples import gpt``).
Run the scripts from the repository root as modules::

    python -m examples.train_lm
    python -m examples.paper_miniature --quick

Not part of the installed wheel (``pyproject.toml`` packages only
``flora_optax``).
"""
