"""The attacks, in one place for callers (evaluation, methods); each lives in its own module."""

from pipeline.adversarial.bisection import bisect
from pipeline.adversarial.boundary import BoundaryResult, boundary_attack
from pipeline.adversarial.context import attack_mode, unwrap
from pipeline.adversarial.pgd import fgsm, pgd

__all__ = ["BoundaryResult", "attack_mode", "bisect", "boundary_attack", "fgsm", "pgd", "unwrap"]
