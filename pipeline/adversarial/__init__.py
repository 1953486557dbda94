"""Attacks (``attack``: their shape; ``pgd``, ``apgd``, ``boundary``), tasks (``tasks``), per-sample state (``state``)
and training methods (``methods``).

Import from the submodules; this package file imports nothing, so that light users (the per-sample state in
a DDP worker, say) do not pay for MONAI's import.
"""
