"""A reproducible data-to-model pipeline for small language models.

Stages live in their own modules, each with a pure ``run(cfg) -> summary`` entry point;
the CLI (``python -m pipeline``), ``dvc.yaml`` and the Prefect flows all call them.
"""

__version__ = "0.1.0"

