"""Real Criteo / Avazu formats: streaming readers, preprocessing into parquet + vocabulary +
frequencies (``python -m data.prepare``), the prepared-data reader and a synthetic generator
writing the same raw formats (``python -m data.synthetic``)."""

from data.batches import PreparedDataset, SplitArrays, iter_batches, to_kjt
from data.schema import AVAZU, CRITEO, SCHEMAS, DatasetSchema, get_schema

__all__ = ["AVAZU", "CRITEO", "SCHEMAS", "DatasetSchema", "PreparedDataset", "SplitArrays", "get_schema",
           "iter_batches", "to_kjt"]
