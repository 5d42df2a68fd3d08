from ..storage.fingerprint import digest
from .store import CacheGroup, CacheWriter, describe_difference, to_tensor

__all__ = ["CacheGroup", "CacheWriter", "describe_difference", "digest", "to_tensor"]
