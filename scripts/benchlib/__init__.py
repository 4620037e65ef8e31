"""The shared library of the scripts in ``scripts/`` (benchmarks and data preparation); not part of
the ``unetcli`` package.

Scripts run as ``python scripts/NAME.py``, so ``scripts/`` is on ``sys.path`` and they import
``benchlib.<module>`` directly. Modules, lowest first (none imports a script or a module listed
after it):

* ``machine``      machine description, peak-RSS bookkeeping, timing, tables, JSON output.
* ``scoring``      Dice on prediction folders, through ``unetcli.evaluation.metrics``.
* ``runs``         ``unet`` subprocesses: train for N iterations, predict, score with ``unet eval``.
* ``volumes``      NIfTI helpers and source-data readers shared by the ``prepare_*`` scripts.
* ``thick_slices`` the thick-slice MNI octant dataset (``prepare_thick_slice_data.py``).
* ``finetune_data`` the 2-class task of the fine-tuning benchmark (``prepare_finetune_demo.py``).
"""
