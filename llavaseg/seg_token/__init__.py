"""LISA-style ``[SEG]``-token segmentation (the rival route): model, losses, training step, checkpoints.

Public API::

    from llavaseg.seg_token import (create_seg_token_model, seg_token_train_step, make_batch, SegSample,
                                    make_optimizer, save_seg_token_model, load_seg_token_model, predict)
"""

from llavaseg.seg_token.checkpoint import load_seg_token_model, save_seg_token_model
from llavaseg.seg_token.inference import predict
from llavaseg.seg_token.model import (
    LoraSettings,
    SegTokenConfig,
    SegTokenModel,
    add_seg_token,
    create_seg_token_model,
    seg_token_mask,
    select_seg_hidden,
)
from llavaseg.seg_token.train import (
    SegSample,
    SegTokenBatch,
    make_batch,
    make_optimizer,
    seg_token_losses,
    seg_token_train_step,
    warmup_decay,
)

__all__ = [
    "LoraSettings", "SegTokenConfig", "SegTokenModel", "add_seg_token", "create_seg_token_model", "seg_token_mask",
    "select_seg_hidden", "SegSample", "SegTokenBatch", "make_batch", "make_optimizer", "seg_token_losses",
    "seg_token_train_step", "warmup_decay", "save_seg_token_model", "load_seg_token_model", "predict",
]
