"""Training machinery for the adapter variants: data, model loading, the loop, tracking, run dirs."""

from .experiment import run_experiment

__all__ = ["run_experiment"]
