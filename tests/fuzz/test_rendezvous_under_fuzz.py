"""Fuzzing clients beside honest ones, on loopback with real sockets: the real
rendezvous server and the doctor's responder keep serving the honest ones.

Eight fuzzing clients (from their own loopback addresses, 127.0.0.10-17) send
hostile streams in a loop (raw bytes, frames of junk JSON, hellos with hostile
fields, cut into pieces, then closed, reset or left open) while honest pairs meet
one after another, each in under a second, and honest doctor clients get their
``seen``. Every problem costs one rate-limited log line at most; no exception
escapes the machines (no "rendezvous error" line).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import random
import socket
import struct
import time

import pytest

from nopf_web.rendezvous.doctor import DoctorResponder
from nopf_web.rendezvous.server import RendezvousServer
from nopf_web.rendezvous.server_machine import ServerLimits
from nopf_web.wire import doctor as dw
from nopf_web.wire.address import Endpoint
from tests.e2e.relay_clients import coordinate
from tests.fuzz.budget import PIECES, examples

FUZZERS = [f"127.0.0.{10 + i}" for i in range(8)]


def hostile_stream(rng: random.Random) -> bytes:
    """One connection's worth of hostile bytes."""
    def text() -> str:
        return "".join(rng.choice(PIECES) for _ in range(rng.randint(0, 6)))

    def junk() -> object:
        return rng.choice([None, True, -1, 2**70, 1.5, text(), [text()], {text(): text()}])

    kind = rng.randrange(5)
    if kind == 0:
        return rng.randbytes(rng.randint(1, 300))
    if kind == 1:
        return b"GET / HTTP/1.1\r\nHost: x\r\n\r\n"
    hello: dict[str, object] = {"type": rng.choice(["hello", "pong", "pake", "probe", "x"]),
                                "version": rng.choice([2, 2, 1, "2"]),
                                "action": rng.choice(["share", "join", "resume", text()]),
                                "nameplate": rng.choice([None, 1, -5, "²", junk()]),
                                "lan": rng.choice([[], ["1.2.3.4:²"], [text()], junk()]),
                                "probe": rng.choice([None, "1.2.3.4:٣", text()]),
                                "punch_timeout": rng.choice([5, 0, 1e308, "5", junk()])}
    for key in rng.sample(sorted(hello), rng.randint(0, 3)):
        del hello[key]
    payload = json.dumps(hello).encode("utf-8", "surrogatepass")
    if kind == 2:
        payload = b"[" * rng.randint(1, 50_000)
    if kind == 3:
        return struct.pack("!I", rng.randint(0, 2**32 - 1)) + payload
    return struct.pack("!I", len(payload)) + payload


async def fuzz_client(addr: tuple[str, int], source: str, rng: random.Random,
                      stop: asyncio.Event, counter: list[int]) -> None:
    loop = asyncio.get_running_loop()
    while not stop.is_set():
        sock = socket.socket()
        sock.setblocking(False)
        try:
            sock.bind((source, 0))
            await loop.sock_connect(sock, addr)
            data = hostile_stream(rng)
            while data:
                piece, data = data[:rng.randint(1, 64)], data[rng.randint(1, 64):]
                await loop.sock_sendall(sock, piece)
            how = rng.randrange(3)
            if how == 0:
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
            elif how == 1:
                with contextlib.suppress(TimeoutError, OSError):
                    async with asyncio.timeout(0.3):  # read whatever comes, then go
                        while await loop.sock_recv(sock, 4096):
                            pass
            counter[0] += 1
        except OSError:
            pass  # reset by the server mid-send: that is its answer
        finally:
            sock.close()
        await asyncio.sleep(0)


async def honest_doctor(addr: tuple[str, int]) -> tuple[list[object], int]:
    """A doctor client's check without dial-back: the messages back, and our port."""
    reader, writer = await asyncio.open_connection(*addr)
    port = int(writer.get_extra_info("sockname")[1])
    try:
        writer.write(dw.encode(dw.Check(False)))
        frames = dw.FrameReader()
        out: list[object] = []
        async with asyncio.timeout(5):
            while chunk := await reader.read(4096):
                out += [dw.decode_responder_message(f) for f in frames.feed(chunk)]
        return out, port
    finally:
        writer.close()


async def test_fuzzing_clients_leave_honest_pairs_served(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO)
    pairs = min(examples(20), 200)
    server = RendezvousServer("127.0.0.1", 0, ServerLimits(write_timeout=2.0))
    await server.start()
    stop = asyncio.Event()
    counter = [0]
    try:
        async with DoctorResponder("127.0.0.1", 0) as doctor, asyncio.TaskGroup() as tg:
            for i, source in enumerate(FUZZERS):
                tg.create_task(fuzz_client(server.address if i % 2 else doctor.address, source,
                                           random.Random(i), stop, counter), name=f"fuzz-{i}")
            await asyncio.sleep(0.3)  # let the fuzzing get going
            times = []
            for _ in range(pairs):
                t0 = time.monotonic()
                fs, fj = await coordinate(server.address, "127.0.0.2", "127.0.0.3",
                                          symmetric=False)
                times.append(time.monotonic() - t0)
                assert fs.peer_public.host == "127.0.0.3" and fj.peer_public.host == "127.0.0.2"
                seen, port = await honest_doctor(doctor.address)
                assert seen == [dw.Seen(Endpoint("127.0.0.1", port), ())]
            stop.set()
        assert counter[0] > pairs, counter  # the fuzzers were busy all along
        print(f"{pairs} pairs met in {min(times):.3f}-{max(times):.3f} s beside "
              f"{counter[0]} fuzzing connections")
        assert max(times) < 1.0, times
    finally:
        await server.close()
    lines = [r.getMessage() for r in caplog.records]
    assert not [x for x in lines if "rendezvous error" in x or "Traceback" in x], lines[:20]

