"""Experiment plumbing: the spec, data sets, runs and checkpoints, the training loop, and the
entry points ``train_run`` / ``evaluate_run``. Imports the algorithms layer, never reporting."""
