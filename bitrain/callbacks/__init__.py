"""Lightning callbacks: behaviours a run switches on in ``configs/callbacks/``, or always on.

:func:`bitrain.training.runner.build` always adds the first two.

* :mod:`.preemption`: SIGTERM / Ctrl-C -> ``last.ckpt`` of the last finished step, exit 143 / 130.
* :mod:`.rng_state`: Python / NumPy / torch RNG states in every checkpoint.
* :mod:`.progress`: a rich bar on a terminal, one line every N steps elsewhere.
* :mod:`.panels`: image panels of pretraining and tokenizer training (PNG + wandb).
"""
