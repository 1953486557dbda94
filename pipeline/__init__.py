"""medrobust: adversarially robust medical imaging on MONAI, tracked in MLflow."""

__version__ = "0.1.0"
