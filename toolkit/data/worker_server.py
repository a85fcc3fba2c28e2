"""Imported only by the DataLoader workers' forkserver (:data:`toolkit.data.loader.PRELOAD`), never by a trainer.

Slurm's preemption signals every process of the job. The trainer catches the signal and checkpoints
at the next step boundary; its workers ignore it (``worker_init_fn``), and so must the forkserver
they are forked from: killed, it would take the workers' shared-memory channel with it and the
trainer's next batch would fail before the checkpoint. The server still exits with its trainer.
"""

from toolkit.distributed import ignore_stop_signals

ignore_stop_signals()
