"""Datasets: schemas (Criteo, Avazu, or a schema file describing your own data), streaming readers,
preprocessing into parquet + vocabulary + frequencies (``python -m data.prepare``), the
prepared-data reader and a synthetic generator writing the same raw formats
(``python -m data.synthetic``)."""

from data.batches import PreparedDataset, SplitArrays, iter_batches, to_kjt
from data.schema import (
    AVAZU,
    CRITEO,
    EXAMPLE_SCHEMA,
    SCHEMAS,
    DatasetSchema,
    SchemaError,
    get_schema,
    load_schema,
)

__all__ = ["AVAZU", "CRITEO", "EXAMPLE_SCHEMA", "SCHEMAS", "DatasetSchema", "PreparedDataset", "SchemaError",
           "SplitArrays", "get_schema", "iter_batches", "load_schema", "to_kjt"]
