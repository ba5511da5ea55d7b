"""Teacher cache: token targets on disk (format, writer, reader) and the training loader.

build_token_cache(teacher, examples, out_dir, ...) -> manifest   (writer.py)
open_cache(path, expect) -> TokenCache                            (reader.py)
cache_info(path) -> dict; verify_cache(path) -> dict              (reader.py)
Loader(source, batch_size=, seq_len=, seed=)                      (loader.py)
"""

from mlx_distill.cache.reader import CacheRow, TokenCache, cache_info, open_cache, verify_cache
from mlx_distill.cache.writer import build_token_cache

__all__ = [
    "CacheRow",
    "TokenCache",
    "build_token_cache",
    "cache_info",
    "open_cache",
    "verify_cache",
]
