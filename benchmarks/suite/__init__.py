"""The benchmark suite behind ``python -m benchmarks.run``, by role: ``settings.py`` (budgets,
presets and the agents' own settings as data; the env keyword arguments of every cell),
``agents.py`` (the registry: one entry per agent), ``cells.py`` (one cell: train, evaluate, the
learning curve), ``stats.py`` (bootstrap CIs, paired differences), ``report.py`` (table, verdict,
plots). ``benchmarks/run.py`` is the command line and the run over cells.
"""
