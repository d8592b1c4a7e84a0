"""The process around training: launch environment, control plane, exit codes, random streams.
Nothing here imports torch at import time except :mod:`.rng`."""
