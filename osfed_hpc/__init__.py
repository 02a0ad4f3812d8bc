"""osfed-hpc: federated learning with snapshot communication (OS-Fed, 3SFC) and baselines, under MPI."""

__version__ = "0.1.0"
