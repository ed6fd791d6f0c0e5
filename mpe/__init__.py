"""Mixed-Precision Embeddings (Li et al., arXiv 2409.20305): frequency groups learn
distributions over bit-widths, one bit-width per group is selected, the model is retrained at
those bit-widths and the tables are exported bit-packed.

    from mpe import MPEConfig, run, load_served_model
"""

from mpe.config import DEFAULT_L2, DEFAULT_LAMBDA, MPEConfig, SearchConfig
from mpe.embedding import MixedPrecisionEmbedding
from mpe.exporter import export_model
from mpe.pipeline import run
from mpe.run_dir import load_model
from mpe.serving import load_exported_program, load_served_model

__all__ = ["DEFAULT_L2", "DEFAULT_LAMBDA", "MPEConfig", "MixedPrecisionEmbedding", "SearchConfig", "export_model",
           "load_exported_program", "load_model", "load_served_model", "run"]
