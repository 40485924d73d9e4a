"""Training loops for the architectures that need retraining (see train/README.md)."""

from train import logs as _logs

_logs.quiet_startup()   # launchers start without backend-probe / font-cache noise
