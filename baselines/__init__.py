"""Compressed-embedding baselines behind one interface (``baselines.base.CompressedEmbedding``).

``baselines.registry.METHODS`` names every method the AUC-vs-size benchmark
(``python -m experiments.auc_vs_size``) can run, MPE included.
"""
