"""Data: sources -> formats (validation) -> tokenize -> Grain pipeline; toy task."""

from jaxalign.data.formats import (
    FORMATS,
    DataError,
    validate_record,
    validate_records,
)
from jaxalign.data.pipeline import make_dataset, ordered_batches
from jaxalign.data.sources import load_records
from jaxalign.data.tokenize import (
    TokenizeConfig,
    bucket_lengths,
    make_tokenize_fn,
    tokenize_example,
    tokenize_records,
)
from jaxalign.data.toy import ArithmeticTask, Problem, build_tokenizer

__all__ = [
    "FORMATS", "DataError", "validate_record", "validate_records",
    "make_dataset", "ordered_batches", "load_records",
    "TokenizeConfig", "bucket_lengths", "make_tokenize_fn", "tokenize_example",
    "tokenize_records", "ArithmeticTask", "Problem", "build_tokenizer",
]
