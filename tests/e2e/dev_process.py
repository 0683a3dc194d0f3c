"""``payorders dev`` as a process for the e2e tests: on free ports, in a temporary folder,
with none of this shell's stack variables; stopped with Ctrl-C (SIGINT) and its folder
removed, whatever the test did."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from payorders.localstack import stackinfo
from payorders.localstack.binaries import find_binary
from payorders.localstack.ports import free_port

CLI = find_binary("payorders")
PORTS = ("temporal", "ui", "api", "gateway", "worker-metrics", "orders", "stripe")


def clean_env(data_dir: Path | None = None) -> dict[str, str]:
    """This machine's environment without another stack's variables (and ``data_dir`` as
    the data directory, when given)."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PAYORDERS_", "TEMPORAL_"))}
    if data_dir is not None:
        env["PAYORDERS_DATA_DIR"] = str(data_dir)
    return env


@dataclass
class DevProcess:
    tmp: Path
    ports: dict[str, int]
    proc: subprocess.Popen[bytes]
    out: Path

    @property
    def data_dir(self) -> Path:
        return self.tmp / "data"

    def banner(self) -> str:
        return self.out.read_text()


BANNER_END = "Never reuse them elsewhere."
"""The banner's secrets line, after every ``export`` (``DevStack.banner``)."""


@contextmanager
def dev_process(prefix: str, *args: str, within_s: float = 120) -> Iterator[DevProcess]:
    """``payorders dev ARGS`` on free ports, up (its ``stack.json`` written) when yielded."""
    tmp = Path(tempfile.mkdtemp(prefix=prefix))
    out = tmp / "dev.out"
    ports = {name: free_port() for name in PORTS}
    argv = [CLI, "dev", *args]
    for name, port in ports.items():
        argv += [f"--{name}-port", str(port)]
    dev: DevProcess | None = None
    try:
        with out.open("wb") as sink:
            proc = subprocess.Popen(
                argv, env=clean_env(tmp / "data"), stdout=sink, stderr=subprocess.STDOUT
            )
        dev = DevProcess(tmp, ports, proc, out)
        deadline = time.monotonic() + within_s
        # stack.json is written as the stack comes up, the banner just after: wait for both,
        # so a test never reads half a banner.
        while stackinfo.read(dev.data_dir) is None or BANNER_END not in dev.banner():
            assert proc.poll() is None, f"payorders dev exited:\n{dev.banner()}"
            assert time.monotonic() < deadline, f"payorders dev did not come up:\n{dev.banner()}"
            time.sleep(0.2)
        yield dev
    finally:
        if dev is not None and dev.proc.poll() is None:
            dev.proc.send_signal(signal.SIGINT)
            try:
                dev.proc.wait(60)
            except subprocess.TimeoutExpired:
                dev.proc.kill()
                dev.proc.wait()
        shutil.rmtree(tmp, ignore_errors=True)
