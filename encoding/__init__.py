"""General codecs and byte sizes of stored tables: bit packing, Elias-Fano, the bucket id map,
``.npy`` file sizes, and the row layout of torchrec / fbgemm quantized tables."""

from encoding.packing import ef_decode, ef_encode, ef_nbytes, pack_codes, unpack_codes
from encoding.sizes import FP32_BYTES, MAX_BITS, code_range, fp32_table_bytes, npy_file_bytes

__all__ = ["FP32_BYTES", "MAX_BITS", "code_range", "ef_decode", "ef_encode", "ef_nbytes", "fp32_table_bytes",
           "npy_file_bytes", "pack_codes", "unpack_codes"]
