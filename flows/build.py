"""The Prefect flow `build-model`, for `prefect.yaml`'s entrypoint `flows.build:build_model`.

The flow itself is `pipeline/apps/flow.py`, built from the stage registry.
"""

from pipeline.apps.flow import build_model

__all__ = ["build_model"]
