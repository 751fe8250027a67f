"""A real Tollgate process for the SDK tests: started on a free port with a config text, its
log kept to read back. TOLLGATE_BIN names the built binary (scripts/test.sh sets it)."""

import os
import re
import subprocess
import tempfile
import time


class Gateway:
    def __init__(self, config, env=None):
        binary = os.environ.get("TOLLGATE_BIN", "target/debug/tollgate")
        self.workdir = tempfile.TemporaryDirectory()
        path = os.path.join(self.workdir.name, "tollgate.toml")
        with open(path, "w") as f:
            f.write(config)
        self.log = open(os.path.join(self.workdir.name, "tollgate.log"), "w+")
        self.process = subprocess.Popen(
            [binary, "serve", "--config", path],
            stderr=self.log,
            stdout=self.log,
            env={**os.environ, "NO_COLOR": "1", **(env or {})},
        )
        self.origin = None
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline and self.origin is None:
            match = re.search(r"listen=(127\.0\.0\.1:\d+)", self.read_log())
            if match:
                self.origin = f"http://{match.group(1)}"
            elif self.process.poll() is not None:
                break
            time.sleep(0.05)
        if self.origin is None:
            log = self.stop()
            raise RuntimeError(f"tollgate did not start:\n{log}")

    def read_log(self):
        self.log.seek(0)
        return re.sub(r"\x1b\[[0-9;]*m", "", self.log.read())

    def stop(self):
        """Stops the process; returns its log."""
        self.process.terminate()
        self.process.wait(timeout=10)
        log = self.read_log()
        self.log.close()
        self.workdir.cleanup()
        return log
