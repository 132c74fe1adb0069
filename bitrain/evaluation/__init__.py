"""Evaluating trained models, after training: what ``bitrain.evaluate`` and ``bitrain.predict`` run.

* :mod:`.validation`: a classifier checkpoint on labelled data (top-1 / top-5, loss, per class).
* :mod:`.linear_probe`: the BEiT linear probe of a frozen encoder.
* :mod:`.prediction`: the top-k labels of image files.
"""
