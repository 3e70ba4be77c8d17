"""How the config schema reads to people: strict tables, located problems, one error formatter.

Every pydantic model of the configuration derives from ``Table`` (and ``Settings`` words its own
errors the same way). A table words its own fields' problems as they happen, because only the
model knows what its unknown keys are called or what a missing field should have held; the
problems then travel up unchanged, each one located by pydantic's path, and ``format_errors``
turns a ``ValidationError`` into ``(field, problem)`` pairs such as
``("plugins[1] (acme/resizer).match.cmdline", "invalid regex: ...")``.
"""

from __future__ import annotations

from collections.abc import Callable, Hashable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Annotated, Any, ClassVar, Final, Self, TypeVar, get_args

from annotated_types import Ge, Gt
from pydantic import (
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    ModelWrapValidatorHandler,
    TypeAdapter,
    ValidationError,
    model_validator,
)
from pydantic.fields import FieldInfo
from pydantic_core import ErrorDetails, InitErrorDetails, PydanticCustomError

# The error type of a problem already worded for people; nothing rewords it on the way up.
WORDED = "pluginmon"

Location = tuple[int | str, ...]


class ConfigError(Exception):
    """The configuration is invalid. ``located`` lists every ``(field, problem)``; ``problems``
    the same as ``"field: problem"`` lines."""

    def __init__(self, located: Iterable[tuple[str, str]]) -> None:
        self.located: tuple[tuple[str, str], ...] = tuple(located)
        self.problems: tuple[str, ...] = tuple(f"{where}: {what}" for where, what in self.located)
        super().__init__("; ".join(self.problems))


@dataclass(frozen=True, slots=True)
class Expect:
    """Annotated marker: the whole message when this field is missing or has the wrong type."""

    message: str


@dataclass(frozen=True, slots=True)
class Note:
    """Annotated marker: appended to this number field's messages, e.g. ``0 = never``."""

    text: str


def problem(loc: Location, message: str) -> InitErrorDetails:
    return InitErrorDetails(
        type=PydanticCustomError(WORDED, "{message}", {"message": message}), loc=loc, input=None
    )


def problems_error(problems: Iterable[tuple[Location, str]]) -> ValidationError:
    """A ValidationError of worded problems, each at its path below the validator raising it."""
    return ValidationError.from_exception_data(
        "configuration", [problem(loc, message) for loc, message in problems]
    )


# -- wording -------------------------------------------------------------------------------------

_NUMBER_TYPES = frozenset(
    {"int_type", "int_parsing", "int_from_float", "float_type", "float_parsing"}
)
_BOUNDS = {
    "greater_than": ">",
    "greater_than_equal": ">=",
    "less_than": "<",
    "less_than_equal": "<=",
}
_TABLE_TYPES = frozenset({"model_type", "model_attributes_type", "dict_type", "dataclass_type"})
_PLAIN = {
    "string_type": "must be a string",
    "bool_type": "must be true or false",
    "bool_parsing": "must be true or false",
    "list_type": "must be an array",
    "tuple_type": "must be an array",
    "finite_number": "must be a finite number",
    "string_too_short": "must not be empty",
    "missing": "required",
}


def number_text(value: object) -> str:
    """``86400`` for 86400.0, as a person writes it in the file."""
    if isinstance(value, float) and value.is_integer() and abs(value) < 1e15:
        return str(int(value))
    return str(value)


def _field_words(field: FieldInfo | None) -> tuple[Expect | None, Note | None, str, str | None]:
    """The field's markers, "a number" or "an integer", and its lower bound as text."""
    if field is None:
        return None, None, "a number", None
    expect = next((m for m in field.metadata if isinstance(m, Expect)), None)
    note = next((m for m in field.metadata if isinstance(m, Note)), None)
    types = get_args(field.annotation) or (field.annotation,)
    kind = "an integer" if int in types and float not in types else "a number"
    lower = None
    for m in field.metadata:
        if isinstance(m, Ge):
            lower = f">= {number_text(m.ge)}"
        elif isinstance(m, Gt):
            lower = f"> {number_text(m.gt)}"
    return expect, note, kind, lower


def word(error: ErrorDetails, owner: type[BaseModel] | None = None) -> str:
    """One pydantic error as a sentence; ``owner`` is the model whose validation raised it."""
    kind_of = error["type"]
    if kind_of == WORDED:
        return error["msg"]
    loc = error["loc"]
    own_field = owner is not None and len(loc) == 1 and isinstance(loc[0], str)
    field = owner.model_fields.get(str(loc[0])) if owner is not None and own_field else None
    if kind_of == "extra_forbidden" and own_field and owner is not None:
        return str(getattr(owner, "unknown_key", "unknown field"))
    if kind_of in ("value_error", "assertion_error"):
        ctx = error.get("ctx") or {}
        return str(ctx.get("error") or error["msg"].removeprefix("Value error, "))
    if kind_of in _TABLE_TYPES:
        what = getattr(owner, "what", "a table") if owner is not None and not loc else "a table"
        return f"must be {what}"
    if kind_of == "literal_error":
        expected = str((error.get("ctx") or {}).get("expected", ""))
        return "must be one of " + expected.replace("'", "").replace(" or ", ", ")
    expect, note, kind, lower = _field_words(field)
    hint = f" ({note.text})" if note is not None else ""
    if expect is not None and (
        kind_of in _NUMBER_TYPES or (kind_of in _PLAIN and kind_of != "finite_number")
    ):
        return expect.message
    if kind_of in _NUMBER_TYPES:
        return f"must be {kind}" + (f" {lower}" if lower else "") + hint
    if kind_of in _BOUNDS:
        bound = next(iter((error.get("ctx") or {}).values()), "?")
        if kind_of.startswith("greater"):
            return f"must be {kind} {_BOUNDS[kind_of]} {number_text(bound)}{hint}"
        return f"must be {kind} {_BOUNDS[kind_of]} {number_text(bound)}"
    if kind_of in _PLAIN:
        return _PLAIN[kind_of]
    return error["msg"]


def reword(exc: ValidationError, owner: type[BaseModel]) -> ValidationError:
    """``exc`` with every problem not yet worded worded as ``owner``'s."""
    return problems_error((error["loc"], word(error, owner)) for error in exc.errors())


# -- formatting ----------------------------------------------------------------------------------


def location(loc: Sequence[int | str]) -> str:
    """``("plugins", "[1] (acme/x)", "match", "cmdline")`` -> ``plugins[1] (acme/x).match.cmdline``."""
    out = ""
    for part in loc:
        if isinstance(part, int):
            out += f"[{part}]"
        elif part.startswith("["):  # an entry with its label, see entries()
            out += part
        elif not part.startswith("function-"):  # pydantic's name for a validator step
            out += ("." if out else "") + part
    return out or "config"


def format_errors(exc: ValidationError, prefix: Location = ()) -> list[tuple[str, str]]:
    """The one formatter: every problem of ``exc`` as ``(field, problem)``, in order."""
    out: list[tuple[str, str]] = []
    for error in exc.errors(include_url=False):
        pair = (location((*prefix, *error["loc"])), word(error))
        if pair not in out:
            out.append(pair)
    return out


# -- shared limits and field types -------------------------------------------------------------

# Limits keep numbers finite and sane: an interval of 1e308 s is a mistake, not a wish (and
# overflows the scheduler), as is a weight of 1e300.
HOUR: Final = 3600.0
DAY: Final = 86400.0
YEAR: Final = 365 * DAY
MAX_ATTEMPTS: Final = 1_000_000
MAX_BYTES: Final = 1 << 60  # an exbibyte: beyond any memory a plugin can have
MAX_WEIGHT: Final = 1e6
MAX_PERCENT: Final = 100_000.0  # a thousand cores

Finite = Field(allow_inf_nan=False)


def seconds(*, gt: float | None = None, ge: float | None = None, le: float) -> Any:
    """A finite number of seconds within bounds (``Annotated[float, seconds(gt=0, le=HOUR)]``)."""
    return Field(gt=gt, ge=ge, le=le, allow_inf_nan=False)


# -- tables --------------------------------------------------------------------------------------


class Table(BaseModel):
    """A config table: strict types, unknown keys refused, every problem worded and located."""

    model_config = ConfigDict(extra="forbid", frozen=True, strict=True)

    # How this table's unknown keys and a value that is not a table at all are reported.
    unknown_key: ClassVar[str] = "unknown field"
    what: ClassVar[str] = "a table"

    @classmethod
    def label(cls, raw: object) -> str | None:
        """What names an entry of an array of these tables in messages: "acme/resizer"."""
        return None

    @classmethod
    def table_problems(cls, raw: object) -> list[str]:
        """Problems of the table as a whole that are reported even when fields are wrong too."""
        return []

    @model_validator(mode="wrap")
    @classmethod
    def _worded(cls, data: Any, handler: ModelWrapValidatorHandler[Self]) -> Self:
        problems: list[tuple[Location, str]] = [((), p) for p in cls.table_problems(data)]
        try:
            table = handler(data)
        except ValidationError as exc:
            problems = [(e["loc"], word(e, cls)) for e in exc.errors()] + problems
        if problems:
            raise problems_error(problems)
        return table


T = TypeVar("T", bound=Table)


def entries(
    model: type[T],
    *,
    key: Callable[[int, T], Hashable] | None = None,
    duplicate: Callable[[int, T], tuple[str | None, str]] | None = None,
) -> BeforeValidator:
    """An array of ``model`` tables, validated one by one so that every entry's problems are
    reported, each under ``[index] (label)``. With ``key``, a valid entry whose key an earlier
    one has is refused: ``duplicate(first_index, entry)`` gives the field (None: the entry)
    and the message."""

    def validate(raw: object) -> tuple[T, ...]:
        if raw is None:
            return ()
        if isinstance(raw, str | bytes | Mapping) or not isinstance(raw, Sequence):
            raise ValueError("must be an array of tables")
        out: list[T] = []
        problems: list[tuple[Location, str]] = []
        first: dict[Hashable, int] = {}
        for index, item in enumerate(raw):
            label = model.label(item)
            at = f"[{index}]" + (f" ({label})" if label else "")
            try:
                entry = model.model_validate(item)
            except ValidationError as exc:
                problems += [((at, *e["loc"]), word(e, model)) for e in exc.errors()]
                continue
            if key is not None and duplicate is not None:
                k = key(index, entry)
                if k in first:
                    field, message = duplicate(first[k], entry)
                    problems.append(((at,) if field is None else (at, field), message))
                    continue
                first[k] = index
            out.append(entry)
        if problems:
            raise problems_error(problems)
        return tuple(out)

    return BeforeValidator(validate)


Glob = Annotated[str, Expect("must be a non-empty glob string"), Field(min_length=1)]


def validate_section(adapter: TypeAdapter[Any], raw: object, where: Location) -> Any:
    """``raw`` validated on its own as the section at ``where``; ConfigError lists every problem."""
    try:
        return adapter.validate_python(raw)
    except ValidationError as exc:
        raise ConfigError(format_errors(exc, prefix=where)) from None
