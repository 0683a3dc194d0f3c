"""Private stacks choose their ports below the kernel's ephemeral range, so that no
outgoing connection of the same machine takes one between choosing and binding it."""

from __future__ import annotations

import socket
import tempfile
from pathlib import Path

from payorders.localstack import ports


def test_a_free_port_is_below_the_ephemeral_range_and_bindable() -> None:
    top = ports.ephemeral_start()
    chosen = {ports.free_port() for _ in range(50)}
    assert all(ports.LOWEST <= p < top for p in chosen)
    assert len(chosen) > 40, "chosen at random, not one port again and again"
    port = chosen.pop()
    with socket.socket() as s:
        s.bind(("127.0.0.1", port))


def test_a_port_in_use_is_not_bindable_and_the_one_beside_it_is_chosen_when_free() -> None:
    with socket.socket() as s:
        s.bind(("127.0.0.1", ports.free_port()))
        s.listen()
        held = s.getsockname()[1]
        assert not ports.bindable("127.0.0.1", held)
        beside = ports.port_beside("127.0.0.1", held - 1)
        assert beside != held


def test_the_ephemeral_range_is_read_from_the_kernel_and_defaults_to_linuxs() -> None:
    with tempfile.TemporaryDirectory() as d:
        f = Path(d) / "range"
        f.write_text("40000\t60999\n")
        assert ports.ephemeral_start(f) == 40000
        f.write_text("garbage")
        assert ports.ephemeral_start(f) == 32768
        assert ports.ephemeral_start(Path(d) / "absent") == 32768
