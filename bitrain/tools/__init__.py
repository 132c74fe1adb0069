"""Tools around the runs (each behind a ``python -m bitrain.<name>`` command or a script).

* :mod:`.doctor`: checks a run's inputs (tokenizer, data, devices, loader speed) before it starts.
* :mod:`.report`: plots and ``report.md`` from runs' ``metrics.csv`` (sweeps compared).
* :mod:`.demo`: the embedded end-to-end demo (``make demo``).
* :mod:`.recipes`: the recipe cards (the official commands, flag by flag) and their check.
"""
