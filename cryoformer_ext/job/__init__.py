"""Training a job end to end: the run (train, then analyse) and the worker launcher."""
