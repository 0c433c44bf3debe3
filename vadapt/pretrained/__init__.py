"""Readers for the checkpoint formats users hold, mapped onto vadapt's module names."""
