"""Run a command and report its exit code on stderr: ``rank R exited with code C``.

Under mpirun with failure recovery on, mpirun does not pass the ranks' exit codes on; this
wrapper lets a test see each rank's own code.
"""
import os
import subprocess
import sys

code = subprocess.call(sys.argv[1:])
print(f"rank {os.environ.get('OMPI_COMM_WORLD_RANK', '?')} exited with code {code}", file=sys.stderr, flush=True)
sys.exit(code)
