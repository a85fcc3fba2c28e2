"""``python -m toolkit bench``: speed measurements anyone can rerun, printed as one JSON line.

* ``bench --config RECIPE [key=value ...]`` (:mod:`.training`): a short training run and one
  evaluation pass of the recipe, with throughput, MFU, memory and loader figures;
* ``bench features`` (:mod:`.features`): cached log-mel features against features computed per batch.
"""
