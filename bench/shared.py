"""The rendezvous shared through Redis (``nopf-server --redis``): pairings per second
with one node and with two, the pairing latency a second node adds, and Redis'
memory per waiting sharer.

    .venv/bin/python -m bench.shared [--quick] [--json FILE]

Everything on loopback: one ``redis-server`` (no persistence) on a free port, real
``nopf-server`` processes, and simulated peers from this process (the asyncio
clients of :mod:`bench.scn_rendezvous`: hello, nameplate, claim, the two fire
instructions; no punch). Sharers and joiners come from many 127.x.y.z sources so no
per-source cap is reached.

- **pairings/s**: ``workers`` loops of sharer + joiner for a window: in-memory (no
  ``--redis``), one ``--redis`` node, and two nodes (each pair's sharer on one node,
  its joiner on the other, alternating), rounds alternating the setups.
- **latency**: one pair at a time, from the joiner's connect to both fires in hand:
  in-memory, sharer and joiner on one ``--redis`` node, on two nodes.
- **memory**: ``used_memory`` of Redis (INFO) before and after N waiting sharers,
  and MEMORY USAGE of one sharer's key.
- **CPU per pairing** of the nodes, Redis and the load processes, and Redis'
  commands per pairing (INFO commandstats); the capacity ratio projected for a
  core per node. ``--baseline DIR`` adds nodes run from DIR/nopf_web (an earlier
  commit's) to the same rounds: a change's before/after ratio from one run.
  ``--pin``: nodes on CPU 1, the rest on CPU 0.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import statistics
import subprocess
import sys
import threading
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path
from typing import Any

from bench.paths import stop_proc
from bench.scn_rendezvous import LO, STEP_TIMEOUT, Peer, for_window, hello, one_pair, source
from bench.scn_util import raise_nofile
from bench.secure import cpu_seconds
from nopf_web.wire.rendezvous import Welcome
from tests.programs import argv
from tests.redis_server import RedisServer, free_port


class Node:
    def __init__(self, redis: str | None, source: Path | None = None) -> None:
        """``source``: a directory holding another ``nopf_web`` (an earlier commit's,
        for a before/after comparison in one run), run instead of this one."""
        extra = ["--redis", redis] if redis else []
        args = ("--host", "127.0.0.1", "--port", "0", "--no-doctor", *extra)
        env = None
        if source is not None:
            env = {**os.environ, "PYTHONPATH": str(source)}
        self.proc = subprocess.Popen(
            argv("nopf-server", *args) if source is None
            else [sys.executable, "-m", "nopf_web.cli.server", *args],
            stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
            env=env, cwd=source)
        assert self.proc.stderr is not None
        line = self.proc.stderr.readline().decode()
        assert "listening on" in line, line
        self.port = int(line.rsplit(":", 1)[1])
        self.ready = threading.Event()
        if not redis:
            self.ready.set()
        threading.Thread(target=self._drain, daemon=True).start()
        if not self.ready.wait(10):
            raise RuntimeError("the node never reached Redis")

    def _drain(self) -> None:
        assert self.proc.stderr is not None
        for raw in self.proc.stderr:
            if b"shared state reachable" in raw:
                self.ready.set()

    def cpu(self) -> float:
        return cpu_seconds(self.proc.pid)

    def stop(self) -> None:
        stop_proc(self.proc, grace=10)


async def rate(ports: list[tuple[int, int]], workers: int, window: float,
               first: int = 0) -> tuple[int, int]:
    """Exchanges for ``window`` s, worker ``w`` through the ``w``-th (sharer, joiner) node
    ports (round robin): (pairs, errors)."""
    return await for_window(window, workers,
                            lambda w: one_pair(*ports[w % len(ports)], w), first)


def _load(args: tuple[list[tuple[int, int]], int, float, int]) -> tuple[int, int, float]:
    """One load process (the simulated peers are the bottleneck of a single one): its
    pairings, errors and CPU seconds."""
    c0 = time.process_time()
    done, errors = asyncio.run(rate(*args))
    return done, errors, time.process_time() - c0


def rate_in(pool: ProcessPoolExecutor, procs: int, ports: list[tuple[int, int]],
            workers: int, window: float) -> tuple[int, int, float]:
    """Pairings, errors and the load processes' CPU seconds, over ``window``."""
    per = workers // procs
    runs = list(pool.map(_load, [(ports, per, window, i * per) for i in range(procs)]))
    return sum(r[0] for r in runs), sum(r[1] for r in runs), sum(r[2] for r in runs)


async def latencies(share_port: int, join_port: int, count: int) -> list[float]:
    out = []
    for i in range(count):
        out.append(await one_pair(share_port, join_port, i % 200))
    return out


async def hold_sharers(port: int, count: int) -> list[Peer]:
    gate = asyncio.Semaphore(100)
    peers: list[Peer] = []

    async def one(i: int) -> None:
        async with gate:
            peer = await Peer.open((LO, port), source(i // 50, 4), hello("share"))
            async with asyncio.timeout(STEP_TIMEOUT):
                msg = await peer.next()
            assert isinstance(msg, Welcome), msg
            peers.append(peer)

    await asyncio.gather(*(one(i) for i in range(count)))
    await asyncio.sleep(0.5)  # their quick pings answered: the records hold their RTTs
    return peers


def used_memory(client: Any) -> int:
    return int(client.info("memory")["used_memory"])


def main(args: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="bench.shared")
    p.add_argument("--quick", action="store_true")
    p.add_argument("--json", type=Path, default=None)
    p.add_argument("--procs", type=int, default=2, help="load processes (simulated peers)")
    p.add_argument("--rounds", type=int, default=None, help="rounds (default 3; 1 quick)")
    p.add_argument("--pin", action="store_true",
                   help="nodes on CPU 1; Redis, the load processes and this one on CPU 0 "
                   "(one node then has a core of its own: its rate checks the CPU model)")
    p.add_argument("--baseline", type=Path, default=None, metavar="DIR",
                   help="also run nodes from DIR/nopf_web (e.g. `git archive REV nopf_web`), "
                   "in the same rounds: before/after ratios of one run")
    opts = p.parse_args(args)
    rounds, window, workers = (1, 1.5, 32) if opts.quick else (3, 3.0, 32)
    rounds = opts.rounds or rounds
    lat_count, sharers = (50, 500) if opts.quick else (300, 5000)
    raise_nofile(4 * sharers + 1024)
    import redis

    out: dict[str, Any] = {"rounds": rounds, "window_s": window, "workers": workers}
    if opts.pin:
        os.sched_setaffinity(0, {0})  # inherited by the load processes and Redis
    with RedisServer("127.0.0.1", free_port()) as server:
        client = redis.Redis(host=server.host, port=server.port, decode_responses=True)
        setups: dict[str, list[Node]] = {}
        try:
            setups = {"in-memory": [Node(None)], "one node": [Node(server.url)],
                      "two nodes": [Node(server.url), Node(server.url)]}
            if opts.baseline is not None:
                base = opts.baseline.resolve()
                setups["one node (baseline)"] = [Node(server.url, base)]
                setups["two nodes (baseline)"] = [Node(server.url, base),
                                                  Node(server.url, base)]
            if opts.pin:
                for nodes in setups.values():
                    for n in nodes:
                        os.sched_setaffinity(n.proc.pid, {1})
            out["pinned"] = opts.pin
            ports = {name: [(nodes[0].port,) * 2] if len(nodes) == 1 else
                     [(nodes[0].port, nodes[1].port), (nodes[1].port, nodes[0].port)]
                     for name, nodes in setups.items()}
            rates: dict[str, list[float]] = {k: [] for k in setups}
            cpu: dict[str, list[float]] = {k: [] for k in setups}
            per_pair: dict[str, list[float]] = {k: [] for k in setups}  # node CPU-ms
            redis_per_pair: dict[str, list[float]] = {k: [] for k in setups}
            load_per_pair: dict[str, list[float]] = {k: [] for k in setups}
            calls_per_pair: dict[str, list[dict[str, float]]] = {k: [] for k in setups}
            pool = ProcessPoolExecutor(opts.procs)
            for r in range(rounds):
                for name, nodes in setups.items():
                    c0 = sum(n.cpu() for n in nodes)
                    c_redis = _redis_cpu(client)
                    calls0 = _redis_calls(client)
                    t0 = time.perf_counter()
                    done, errors, c_load = rate_in(pool, opts.procs, ports[name], workers,
                                                   window)
                    took = time.perf_counter() - t0
                    calls = _redis_calls(client)
                    calls_per_pair[name].append({
                        k: round((v - calls0.get(k, 0)) / max(1, done), 2)
                        for k, v in calls.items() if v - calls0.get(k, 0) > 0})
                    load_per_pair[name].append(c_load / max(1, done) * 1000)
                    rates[name].append(done / took)
                    cpu[name].append((sum(n.cpu() for n in nodes) - c0) / took)
                    per_pair[name].append(cpu[name][-1] * took / max(1, done) * 1000)
                    redis_per_pair[name].append((_redis_cpu(client) - c_redis)
                                                / max(1, done) * 1000)
                    print(f"round {r + 1}: {name}: {done / took:.0f} pairings/s, {errors} errors,"
                          f" nodes' CPU {cpu[name][-1] * 100:.0f} %, redis CPU "
                          f"{(_redis_cpu(client) - c_redis) / took * 100:.0f} %, load "
                          f"{c_load / took * 100:.0f} %; Redis calls per pairing "
                          f"{calls_per_pair[name][-1]}", flush=True)
                    time.sleep(0.3)
            out["pairings_per_s"] = {k: statistics.median(v) for k, v in rates.items()}
            out["pairings_per_s_runs"] = rates
            pool.shutdown()
            out["nodes_cpu_share"] = {k: statistics.median(v) for k, v in cpu.items()}
            out["nodes_cpu_ms_per_pairing"] = {k: statistics.median(v)
                                               for k, v in per_pair.items()}
            out["redis_cpu_ms_per_pairing"] = {k: statistics.median(v)
                                               for k, v in redis_per_pair.items()}
            out["load_cpu_ms_per_pairing"] = {k: statistics.median(v)
                                              for k, v in load_per_pair.items()}
            out["redis_calls_per_pairing"] = {k: v[-1] for k, v in calls_per_pair.items()}
            lat: dict[str, list[float]] = {}
            for name, pair in (("in-memory", ports["in-memory"][0]),
                               ("one node", ports["one node"][0]),
                               ("two nodes", ports["two nodes"][0])):
                lat[name] = asyncio.run(latencies(pair[0], pair[1], lat_count))
            out["latency_ms_p50"] = {k: statistics.median(v) * 1000 for k, v in lat.items()}
            out["latency_ms_p90"] = {k: statistics.quantiles(v, n=10)[-1] * 1000
                                     for k, v in lat.items()}
            print(f"latency p50 ms: {out['latency_ms_p50']}", flush=True)
            client.flushall()
            before = used_memory(client)
            node = setups["one node"][0]

            async def hold() -> tuple[int, int]:
                peers = await hold_sharers(node.port, sharers)
                after = used_memory(client)
                key = next(iter(client.scan_iter("nopf:np:*", count=1000)))
                one = int(client.memory_usage(key, samples=0) or 0)
                for peer in peers:
                    peer.close()
                return after, one

            after, one_key = asyncio.run(hold())
            out["sharers_held"] = sharers
            out["redis_bytes_per_waiting_sharer"] = (after - before) / sharers
            out["redis_memory_usage_one_key"] = one_key
            print(f"Redis memory: {(after - before) / sharers:.0f} B per waiting sharer "
                  f"(MEMORY USAGE of one key: {one_key} B)", flush=True)
        finally:
            for nodes in setups.values():
                for n in nodes:
                    n.stop()
            client.close()
    one, two = out["pairings_per_s"]["one node"], out["pairings_per_s"]["two nodes"]
    out["two_over_one"] = two / one
    out["added_latency_ms_p50"] = (out["latency_ms_p50"]["two nodes"]
                                   - out["latency_ms_p50"]["one node"])
    # Capacity where each node has a core of its own (this machine has two cores for
    # everything): pairings per CPU-second, one node against two.
    cost = out["nodes_cpu_ms_per_pairing"]
    out["projected_two_over_one"] = 2 * cost["one node"] / cost["two nodes"]
    if opts.baseline is not None:
        out["projected_two_over_one_baseline"] = (2 * cost["one node (baseline)"]
                                                  / cost["two nodes (baseline)"])
        # Same run, same rounds: the node CPU per pairing after over before.
        out["node_cpu_after_over_before"] = {
            k: cost[k] / cost[f"{k} (baseline)"] for k in ("one node", "two nodes")}
    print(json.dumps(out, indent=1, default=str))
    if opts.json is not None:
        opts.json.write_text(json.dumps(out, indent=1, default=str))
    return 0


def _redis_calls(client: Any) -> dict[str, int]:
    """Commands Redis has run, by name (a script's own calls counted apart from it)."""
    stats = client.info("commandstats")
    return {k.removeprefix("cmdstat_"): int(v["calls"]) for k, v in stats.items()
            if k not in ("cmdstat_info",)}


def _redis_cpu(client: Any) -> float:
    info = client.info("cpu")
    return float(info["used_cpu_sys"]) + float(info["used_cpu_user"])


if __name__ == "__main__":
    sys.exit(main())
