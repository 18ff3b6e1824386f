from llavaseg.train.loop import *  # noqa: F401,F403 (temporary during the move)
from llavaseg.train.loop import _config_for_resume, load_checkpoint, save_checkpoint, pad_text, predict_logits  # noqa: F401
