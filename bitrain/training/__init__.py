"""Running training: what every training entry point shares.

* :mod:`.runner`: build data module, task and Trainer from a composed config, then fit
  (:func:`~.runner.train`); start-up problems named together; the pretrained normalisation.
* :mod:`.resume`: ``ckpt_path`` (``auto``: the newest readable checkpoint), atomic weights-only
  checkpoint I/O.
* :mod:`.rundir`: run-directory names (``paths.run_name``, SLURM job, date) and the checks made
  before anything is written there.
* :mod:`.devices`: the global batch over devices and nodes, GPUs requested vs visible.
* :mod:`.hyperrule`: BiT-HyperRule (schedule, resolution, Mixup from the dataset size).
* :mod:`.loggers`: the CSV and wandb loggers that continue a resumed run.
* :mod:`.resolvers`: the config resolvers, registered by the entry points.
"""
