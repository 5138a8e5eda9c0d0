"""Reliability helpers: checksummed manifests, resumable block checkpoints, memory guards."""
