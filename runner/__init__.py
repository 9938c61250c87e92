"""Plan, dispatch and compare language-model training jobs across local and rented GPUs."""

__version__ = "0.1.0"
