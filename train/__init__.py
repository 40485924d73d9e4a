"""Training loops for the architectures that need retraining (see train/README.md)."""
