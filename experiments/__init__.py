"""Experiment launchers (absl apps), evaluation tasks, results tables and plots."""

from train import logs as _logs

_logs.quiet_startup()   # launchers start without backend-probe / font-cache noise
