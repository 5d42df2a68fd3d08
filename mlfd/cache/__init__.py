from .store import CacheGroup, describe_difference, digest

__all__ = ["CacheGroup", "describe_difference", "digest"]
