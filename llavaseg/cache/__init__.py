from llavaseg.cache.store import *  # noqa: F401,F403 (temporary during the move)
from llavaseg.cache.store import query_key  # noqa: F401
