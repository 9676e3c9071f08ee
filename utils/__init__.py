"""Workflow: data, model loading and adapters, the calibration driver, parameter files, evaluation."""
