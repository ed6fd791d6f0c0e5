"""The CTR model core every method shares: model assembly (embedding + tower), the trainer,
multi-process training, the shared command-line options and the fp32 CLI (``python -m ctr.train_fp32``)."""

from ctr import _quiet  # noqa: F401  (first: drops torch.fx's is_fx_tracing warning)
from ctr.model import CTRModel, FP32Embedding, ModelConfig
from ctr.trainer import FitResult, NonFiniteLossError, TrainConfig, Trainer, evaluate, predict

__all__ = ["CTRModel", "FP32Embedding", "FitResult", "ModelConfig", "NonFiniteLossError", "TrainConfig", "Trainer",
           "evaluate", "predict"]
