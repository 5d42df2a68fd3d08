"""What every layer writes with: atomic staged directories, fingerprints of inputs, atomic
file writes that name their path on a full disk, and local-path-or-URL locations.

It imports nothing of mlfd but ``mlfd.errors``, so the cache, the training engine and the
workspace can all build on it."""
