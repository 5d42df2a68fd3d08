from ..engine.fingerprint import digest
from .store import CacheGroup, CacheWriter, describe_difference

__all__ = ["CacheGroup", "CacheWriter", "describe_difference", "digest"]
