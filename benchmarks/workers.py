"""Several workers on one file: req/s with 1 and 2 uvicorn workers (DB(shared=True)), in one run.

    .venv/bin/pip install -e '.[bench]'     # and Debian's wrk
    .venv/bin/python benchmarks/workers.py [--seconds 15] [--rounds 2]

The app and the pre-created sessions are load.py's; wrk rotates 10,000 session cookies over a read route
and a write route. Contenders: one process owning the file (the default), one worker sharing it, and
two workers sharing it (on this 2-core machine wrk shares the cores with them). Each worker is its own
uvicorn process on its own port, loaded by its own wrk, all at once: `uvicorn --workers 2` itself answers
a bare Starlette app here in about 43 ms per request (183 req/s; one worker: 7,773 req/s), a delay of the
multi-process server, not of the app, which would hide what the store costs.
"""

from __future__ import annotations

import argparse
import os
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile

from common import free_port, parse_wrk, wait_for
from load import APP, prepare

CONTENDERS = [("1 process, exclusive", 1, False), ("1 worker, shared", 1, True), ("2 workers, shared", 2, True)]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--seconds", type=int, default=15)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--sessions", type=int, default=10_000)
    args = parser.parse_args()
    workdir = tempfile.mkdtemp(dir=".", prefix=".bench-")
    results: dict[tuple[str, str], list[float]] = {}
    try:
        with open(os.path.join(workdir, "load_app.py"), "w") as f:
            f.write(APP)
        for _ in range(args.rounds):
            for name, workers, shared in CONTENDERS:
                db_path = os.path.join(workdir, f"w-{workers}-{shared}.db")
                for leftover in (db_path, db_path + ".lock"):
                    if os.path.exists(leftover):
                        os.unlink(leftover)
                lua = prepare(workdir, db_path, args.sessions)
                env = {**os.environ, "LOAD_DB": db_path, "LOAD_SYNC": "everysec",
                       "LOAD_SHARED": "1" if shared else "0", "PYTHONPATH": workdir}
                ports = [free_port() for _ in range(workers)]
                servers = [subprocess.Popen([sys.executable, "-m", "uvicorn", "load_app:app", "--port", str(port),
                                             "--log-level", "warning", "--no-access-log"], env=env)
                           for port in ports]
                try:
                    for port in ports:
                        wait_for(port)
                    for route in ("read", "write"):
                        loads = [subprocess.Popen(["wrk", "-t1", f"-c{32 // workers}", f"-d{args.seconds}s",
                                                   "--latency", "-s", lua, f"http://127.0.0.1:{port}/{route}"],
                                                  stdout=subprocess.PIPE, text=True) for port in ports]
                        total = 0.0
                        for load in loads:
                            out, _ = load.communicate()
                            report = parse_wrk(out)
                            assert report["errors"] == 0, out
                            total += report["rps"]
                        results.setdefault((name, route), []).append(total)
                finally:
                    for server in servers:
                        server.send_signal(signal.SIGINT)
                    for server in servers:
                        server.wait(timeout=30)
    finally:
        shutil.rmtree(workdir, ignore_errors=True)
    print(f"workers on one file: wrk -t1 -c32 -d{args.seconds}s over {args.sessions:,} sessions, "
          f"{args.rounds} rounds; median req/s; {os.cpu_count()} cores")
    base = {route: statistics.median(results[(CONTENDERS[0][0], route)]) for route in ("read", "write")}
    for name, _, _ in CONTENDERS:
        cells = []
        for route in ("read", "write"):
            rps = statistics.median(results[(name, route)])
            cells.append(f"{route} {rps:7.0f} ({rps / base[route]:.2f}x)")
        print(f"  {name:<22}" + "   ".join(cells))
    one, two = CONTENDERS[1][0], CONTENDERS[2][0]
    for route in ("read", "write"):
        scale = statistics.median(results[(two, route)]) / statistics.median(results[(one, route)])
        print(f"  shared-mode scaling, {route}: 2 workers / 1 worker = {scale:.2f}x"
              + (" (target at least 1.6x)" if route == "write" else ""))


if __name__ == "__main__":
    main()
