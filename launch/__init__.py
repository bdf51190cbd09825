"""Launchers: one host (``local.py``), SLURM (``slurm.py``), TPU pods (``tpu.py``), sweeps
(``sweep.py``). Each is a script (``python launch/X.py --help``); see launch/README.md."""
