"""The interface every adversarial training method implements (one small class per method), its config class,
and the registry that finds both.

A method is one file in this package: a subclass of :class:`Method` that names its config class
(``config_class``, a subclass of :class:`BaseMethodConfig` with ``name: Literal["<name>"] = "<name>"`` and the
knobs the method reads). Defining the class registers it under that name in :data:`METHODS`; the package imports
every module it holds, and ``pipeline.config`` builds the ``method:`` section of the config from the registry.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import ClassVar

import torch
from pydantic import BaseModel, ConfigDict

from pipeline.adversarial.state import SampleState
from pipeline.adversarial.tasks import Task


class BaseMethodConfig(BaseModel):
    """The ``method:`` section of one method: its ``name`` and only the knobs it reads (unknown keys are errors)."""

    model_config = ConfigDict(extra="forbid", validate_assignment=True)

    name: str


@dataclass
class MethodOutput:
    loss: torch.Tensor                 # scalar, to be back-propagated into the parameters
    pred: torch.Tensor                 # network output on the clean inputs (for metrics and handlers)
    adv: torch.Tensor | None = None    # adversarial inputs (for image grids), detached
    metrics: dict[str, float] = field(default_factory=dict)  # per-batch scalars: clean_loss, adv_loss, ...
    done: torch.Tensor | None = None   # the part of the loss already back-propagated (detached), see backward_now


# name -> method class, filled as method classes are defined (``Method.__init_subclass__``)
METHODS: dict[str, type[Method]] = {}


class Method(ABC):
    """One adversarial training method.

    ``loss`` computes the training loss of one batch (it may run attacks; attacks never produce parameter
    gradients). ``roi`` (optional): the batch's region-of-interest mask (B, 1, *spatial); every method passes it
    to the task's losses (segmentation: only ROI pixels count) and to its attacks (perturbation inside it only).
    ``epoch_completed`` applies the end-of-epoch update of the per-sample state and returns scalars to log (eps
    mean/percentiles, tau, ...). ``state`` is None for methods without per-sample state.

    A subclass that sets ``config_class`` in its body is registered in :data:`METHODS` under the ``name`` of that
    config class (``name`` is set from it). Build a method with :meth:`from_config`.
    """

    name: ClassVar[str] = ""
    config_class: ClassVar[type[BaseMethodConfig]]

    def __init_subclass__(cls, **kwargs):
        super().__init_subclass__(**kwargs)
        config_class = cls.__dict__.get("config_class")
        if config_class is None:
            return  # an intermediate class (AttackingMethod) or a subclass reusing its parent's registration
        if not (isinstance(config_class, type) and issubclass(config_class, BaseMethodConfig)):
            raise TypeError(f"{cls.__qualname__}.config_class must be a subclass of BaseMethodConfig")
        name = config_class.model_fields["name"].default
        if not isinstance(name, str) or not name:
            raise TypeError(f"{config_class.__qualname__}.name needs its method's name as default, "
                            "e.g. name: Literal['pgd_at'] = 'pgd_at'")
        if METHODS.get(name, cls) is not cls:
            raise TypeError(f"method '{name}' is defined twice: {METHODS[name].__qualname__} and {cls.__qualname__}")
        cls.name = name
        METHODS[name] = cls

    def __init__(self, task: Task, cfg: BaseMethodConfig, state: SampleState | None = None):
        self.task = task
        self.cfg = cfg
        self.state = state
        # set by the trainer for each step when it may back-propagate part of the loss early (see backward_now)
        self.backward_hook: Callable[[torch.Tensor], None] | None = None

    def backward_now(self, part: torch.Tensor) -> torch.Tensor | None:
        """Back-propagate ``part`` of the loss at once, when the trainer allows it (``backward_hook``), so that
        its autograd graph is freed before the attack instead of held through it (a method whose loss is a sum
        of a clean term and an adversarial term computed from separate forwards: IMA, DPAAT). Returns the
        detached value for ``MethodOutput.done``, or None: then ``part`` belongs in ``MethodOutput.loss``.

        Held through the K attack steps, the clean forward's activations cost a ResNet/UNet step about 13% on
        CPU at 256 x 256 (benchmarks/README.md); the gradients are the same (sums of the same terms)."""
        if self.backward_hook is None:
            return None
        self.backward_hook(part)
        return part.detach()

    @classmethod
    def from_config(cls, cfg: BaseMethodConfig, task: Task, n_train: int,
                    clamp: tuple[float, float] | None = None) -> Method:
        """The method of ``cfg`` for ``task`` on ``n_train`` training samples, with its per-sample state.
        ``clamp``: the valid intensity range attacks clamp to (unused by methods that do not attack)."""
        return cls(task, cfg)

    @abstractmethod
    def loss(self, model: torch.nn.Module, inputs: torch.Tensor, targets: torch.Tensor,
             index: torch.Tensor, roi: torch.Tensor | None = None) -> MethodOutput: ...

    def epoch_completed(self) -> dict[str, float]:
        """The per-sample state's end of epoch, in one place for every method: combine the ranks' records
        (DDP), apply the method's :meth:`update` rule, summarise (eps percentiles, tau, fractions), clear the
        epoch's records. Returns the summary to log ({} for methods without state)."""
        state = self.state
        if state is None:
            return {}
        state.sync_()
        self.update(state)
        state.epoch += 1
        summary = state.summary()
        state.reset_epoch()
        return summary

    def update(self, state: SampleState) -> None:
        """The method's end-of-epoch rule on the epoch's records (radii, tau); none by default."""
