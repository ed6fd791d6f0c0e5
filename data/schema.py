"""Dataset schemas: the one place that says what a raw Criteo or Avazu file looks like.

Every reader, preprocessor, generator and model imports these; nothing else spells
out column names.
"""

from __future__ import annotations

from dataclasses import dataclass

CRITEO_INT_COLUMNS = tuple(f"I{i}" for i in range(1, 14))
CRITEO_CAT_COLUMNS = tuple(f"C{i}" for i in range(1, 27))

AVAZU_CAT_COLUMNS = (
    "C1", "banner_pos", "site_id", "site_domain", "site_category", "app_id",
    "app_domain", "app_category", "device_id", "device_ip", "device_model",
    "device_type", "device_conn_type", "C14", "C15", "C16", "C17", "C18", "C19",
    "C20", "C21",
)
AVAZU_TIME_FIELDS = ("hour_of_day", "weekday", "is_weekend")


@dataclass(frozen=True)
class DatasetSchema:
    """Layout of one dataset's raw train file and of the fields the model sees.

    Attributes:
        name: dataset name used on the command line.
        columns: raw train-file columns, in file order.
        label: name of the label column (absent from the test file).
        delimiter: field separator of the raw file.
        has_header: whether the first line holds column names.
        integer_columns: raw columns that must parse as (possibly negative) integers.
        categorical_columns: raw columns used as categories as they are.
        drop: raw columns read but not used as features.
        fields: model fields after the transform, in order (one embedding table each).
        default_min_count: min_count the MPE paper uses for this dataset.
        rows_full: rows of the full public train file (for docs and extrapolation).
        features_full: vocabulary size the MPE paper reports at min_count 2.
    """

    name: str
    columns: tuple[str, ...]
    label: str
    delimiter: str
    has_header: bool
    integer_columns: tuple[str, ...]
    categorical_columns: tuple[str, ...]
    drop: tuple[str, ...]
    fields: tuple[str, ...]
    default_min_count: int
    rows_full: int
    features_full: int

    @property
    def test_columns(self) -> tuple[str, ...]:
        """Columns of the unlabeled test file (the train columns without the label)."""
        return tuple(c for c in self.columns if c != self.label)

    @property
    def num_fields(self) -> int:
        return len(self.fields)


CRITEO = DatasetSchema(
    name="criteo",
    columns=("label",) + CRITEO_INT_COLUMNS + CRITEO_CAT_COLUMNS,
    label="label",
    delimiter="\t",
    has_header=False,
    integer_columns=CRITEO_INT_COLUMNS,
    categorical_columns=CRITEO_CAT_COLUMNS,
    drop=(),
    fields=CRITEO_INT_COLUMNS + CRITEO_CAT_COLUMNS,
    default_min_count=2,
    rows_full=45_840_617,
    features_full=6_780_382,
)

AVAZU = DatasetSchema(
    name="avazu",
    columns=("id", "click", "hour") + AVAZU_CAT_COLUMNS,
    label="click",
    delimiter=",",
    has_header=True,
    integer_columns=("hour",),
    categorical_columns=AVAZU_CAT_COLUMNS,
    drop=("id",),
    fields=AVAZU_TIME_FIELDS + AVAZU_CAT_COLUMNS,
    default_min_count=2,
    rows_full=40_428_967,
    features_full=4_428_293,
)

SCHEMAS: dict[str, DatasetSchema] = {s.name: s for s in (CRITEO, AVAZU)}


def get_schema(name: str) -> DatasetSchema:
    """Return the schema called ``name``; unknown names raise ``ValueError`` listing the known ones."""
    try:
        return SCHEMAS[name.lower()]
    except KeyError:
        raise ValueError(
            f"unknown dataset {name!r}; known datasets: {', '.join(sorted(SCHEMAS))}"
        ) from None
