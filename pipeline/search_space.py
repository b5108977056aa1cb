"""The Ray Tune search space as typed, validated params: ranges and choices that draw their own values from an
Optuna trial, and one space class per beta-schedule family, derived from the schedule's own fields.

A searched value is written in params.yaml as a fixed value (``4``), a range (``{low: 1, high: 8}``,
``{low: 1.0e-4, high: 3.0e-3, log: true}``) or a list of choices (``{choices: [16, 32, 64]}``).
"""

from __future__ import annotations

import dataclasses
from typing import Annotated, Any, ClassVar

from pydantic import BaseModel, ConfigDict, Discriminator, Field, Tag, create_model, model_validator

from vae.schedules import SCHEDULES


class Section(BaseModel):
    """A frozen params section that refuses unknown keys."""

    model_config = ConfigDict(extra="forbid", frozen=True)


class _Range(Section):
    """A search range [low, high]; the subclasses set the number type."""

    @model_validator(mode="after")
    def _ordered(self) -> _Range:
        if not self.low < self.high:
            raise ValueError(f"low ({self.low}) must be < high ({self.high})")
        if self.log and self.low <= 0:
            raise ValueError(f"a log range needs low > 0 (got {self.low})")
        return self

    def edges(self) -> list[Any]:
        return [self.low, self.high]


class FloatRange(_Range):
    low: float
    high: float
    log: bool = Field(False, description="sample uniformly in log space (learning rates, scales)")

    def suggest(self, trial, name: str) -> float:
        return trial.suggest_float(name, self.low, self.high, log=self.log)


class IntRange(_Range):
    low: int
    high: int
    log: bool = False

    def suggest(self, trial, name: str) -> int:
        return trial.suggest_int(name, self.low, self.high, log=self.log)


class _Choice(Section):
    def edges(self) -> list[Any]:
        return list(self.choices)

    def suggest(self, trial, name: str) -> Any:
        return trial.suggest_categorical(name, list(self.choices))


class FloatChoice(_Choice):
    choices: tuple[float, ...] = Field(min_length=1)


class IntChoice(_Choice):
    choices: tuple[int, ...] = Field(min_length=1)


def _spec_kind(value: Any) -> str:
    if isinstance(value, _Choice) or (isinstance(value, dict) and "choices" in value):
        return "choices"
    if isinstance(value, dict | _Range):
        return "range"
    return "value"


FloatSpec = Annotated[
    Annotated[float, Tag("value")]
    | Annotated[FloatRange, Tag("range")]
    | Annotated[FloatChoice, Tag("choices")],
    Discriminator(_spec_kind),
]
IntSpec = Annotated[
    Annotated[int, Tag("value")] | Annotated[IntRange, Tag("range")] | Annotated[IntChoice, Tag("choices")],
    Discriminator(_spec_kind),
]


def suggest(spec: Any, trial, name: str) -> Any:
    """The value of ``name`` for an Optuna trial: drawn from a range or choices, or the fixed value itself."""
    return spec.suggest(trial, name) if isinstance(spec, _Range | _Choice) else spec


def spec_values(spec: Any) -> list[Any]:
    """The values a spec can produce at its edges: the fixed value, low and high, or every choice."""
    return spec.edges() if isinstance(spec, _Range | _Choice) else [spec]


class FamilySpace(Section):
    """The searched parameters of one beta-schedule family; a parameter left out keeps the schedule's
    default."""

    family: ClassVar[str]

    @model_validator(mode="after")
    def _valid_for_the_schedule(self) -> FamilySpace:
        schedule = SCHEDULES[self.family]
        for name in type(self).model_fields:
            for value in spec_values(getattr(self, name)):
                try:
                    schedule(name=self.family, **{name: value})
                except ValueError as error:
                    raise ValueError(
                        f"{name}: {value!r} is not a valid {self.family} schedule value ({error})"
                    ) from None
        return self

    def suggest(self, trial) -> dict[str, Any]:
        """This family's parameters for a trial, drawn under names ``<family>/<parameter>``."""
        return {
            name: suggest(getattr(self, name), trial, f"{self.family}/{name}")
            for name in type(self).model_fields
        }

    @classmethod
    def schedule(cls, values: dict[str, Any]):
        """The schedule object of drawn values (validated by the schedule itself)."""
        return SCHEDULES[cls.family](name=cls.family, **values)


# A schedule's own fields but these are searchable; `total_steps` of the cyclical schedule is the run's
# length.
_NOT_SEARCHED = {"name", "total_steps"}


def _family_space(family: str, schedule: type) -> type[FamilySpace]:
    """The space class of one family: a field per searchable schedule field, of the same number type, with the
    schedule's default (so the defaults exist once, in vae.schedules)."""
    fields = {}
    for field in dataclasses.fields(schedule):
        if field.name in _NOT_SEARCHED:
            continue
        spec = IntSpec if "int" in str(field.type) else FloatSpec
        fields[field.name] = (spec, field.default)
    space = create_model(f"{schedule.__name__}Space", __base__=FamilySpace, __module__=__name__, **fields)
    space.family = family
    return space


FAMILY_SPACES: dict[str, type[FamilySpace]] = {
    name: _family_space(name, cls) for name, cls in SCHEDULES.items()
}
globals().update({space.__name__: space for space in FAMILY_SPACES.values()})  # importable by name: picklable

_Families = create_model(
    "_Families",
    __base__=Section,
    __module__=__name__,
    **{name: (space | None, None) for name, space in FAMILY_SPACES.items()},
)


class ScheduleFamilies(_Families):
    """The beta-schedule families searched (a family left out or null is not searched), each with its own
    parameters: a cyclical schedule has a cycle count, a constant one does not."""

    @model_validator(mode="after")
    def _at_least_one(self) -> ScheduleFamilies:
        if not self.names():
            raise ValueError(f"name at least one schedule family to search: {', '.join(FAMILY_SPACES)}")
        return self

    def names(self) -> list[str]:
        return [name for name in FAMILY_SPACES if getattr(self, name) is not None]


class SearchSpace(Section):
    """What a sweep searches: the schedule families (each with its parameters), the latent dimension and the
    learning rate. The defaults are the repository's params.yaml."""

    beta_schedule: Annotated[
        ScheduleFamilies,
        Field(
            default_factory=lambda: ScheduleFamilies(
                constant=FAMILY_SPACES["constant"](beta=FloatRange(low=0.25, high=4.0, log=True)),
                linear=FAMILY_SPACES["linear"](warmup_steps=IntRange(low=500, high=5000, log=True)),
                cyclical=FAMILY_SPACES["cyclical"](
                    num_cycles=IntRange(low=1, high=6), ratio=FloatChoice(choices=(0.25, 0.5, 1.0))
                ),
                sigmoid=FAMILY_SPACES["sigmoid"](
                    midpoint_step=IntRange(low=500, high=4000),
                    steepness=FloatRange(low=0.001, high=0.01, log=True),
                ),
                capacity=FAMILY_SPACES["capacity"](
                    gamma=FloatChoice(choices=(100.0, 1000.0)),
                    capacity_max=FloatRange(low=5.0, high=50.0),
                    capacity_steps=IntRange(low=1000, high=6000),
                ),
            )
        ),
    ]
    latent_dim: IntSpec = Field(default_factory=lambda: IntChoice(choices=(16, 32, 64, 128, 256)))
    learning_rate: FloatSpec = Field(default_factory=lambda: FloatRange(low=1e-4, high=3e-3, log=True))

    @model_validator(mode="after")
    def _valid(self) -> SearchSpace:
        if min(spec_values(self.latent_dim)) < 1 or max(spec_values(self.latent_dim)) > 4096:
            raise ValueError("latent_dim: every value must be in [1, 4096]")
        if min(spec_values(self.learning_rate)) <= 0:
            raise ValueError("learning_rate: every value must be > 0")
        return self

    def families(self) -> dict[str, FamilySpace]:
        return {name: getattr(self.beta_schedule, name) for name in self.beta_schedule.names()}
