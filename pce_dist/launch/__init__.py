"""The launchers behind ``launch/local.py`` (N ranks on this machine) and ``launch/slurm.py``
(a submitit job on SLURM).

Package code rather than scripts, so submitit pickles ``TrainJob`` by reference and the
tests import the launchers like any other module. Nothing is imported here.
"""
