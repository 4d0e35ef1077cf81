"""The benchmark report: engine and HTTP comparisons in one run, written to docs/ and the README.

    .venv/bin/pip install -e '.[bench]'
    .venv/bin/python benchmarks/report.py            # a few minutes; --quick for a smoke run

Writes docs/benchmarks.md (tables: medians, min-max over rounds, ratios; the machine and the package
versions), docs/benchmarks.png (the chart), and the headline ratios between the `benchmarks` markers in
README.md. Every figure in those files comes from this one run.
"""

from __future__ import annotations

import argparse
import importlib.metadata
import os
import platform
import re
import sqlite3
import statistics
import sys
import tempfile
import time
from pathlib import Path

import anyio
import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt
import stores as stores_bench
from engine import Series, bench_group_commit, bench_set_get
from sessions import CONTENDERS, PATHS, WRK_CONTENDERS, WRK_PATHS, added_over_bare, in_process, through_uvicorn

ROOT = Path(__file__).resolve().parent.parent
DOCS = ROOT / "docs"
LABELS = {"bare": "no middleware", "floor": "floor (the essential work only)",
          "starlette": "Starlette SessionMiddleware (cookie)", "starsessions": "starsessions, InMemoryStore",
          "buntsession": "buntsession, BuntStore (file)"}
ROUTES = {"get": "reads a small session", "incr": "reads and writes a counter", "put": "writes a small session",
          "profile": "reads a realistic session", "cart": "adds an item to a realistic session's cart"}


def versions() -> str:
    packages = ["buntsession", "starlette", "anyio", "itsdangerous", "starsessions"]
    found = ", ".join(f"{name} {importlib.metadata.version(name)}" for name in packages)
    return (f"Python {platform.python_version()} on {platform.machine()}, {os.cpu_count()} cores, "
            f"{platform.system()} {platform.release()}; sqlite {sqlite3.sqlite_version}; {found}")


def series_table(rows: list[Series], base: Series) -> list[str]:
    lines = ["| measurement | median µs | min-max µs | ratio |", "|---|---|---|---|"]
    for s in rows:
        ratio = "base" if s is base else f"{s.median / base.median:.2f}×"
        lines.append(f"| {s.name} | {s.median * 1e6:.3f} | {min(s.samples) * 1e6:.3f}-{max(s.samples) * 1e6:.3f} "
                     f"| {ratio} |")
    return lines


async def measure(quick: bool) -> tuple[dict[str, list[Series]], list[Series], dict[str, dict[str, list[float]]]]:
    with tempfile.TemporaryDirectory(dir=".", prefix=".bench-") as workdir:
        engine = await bench_set_get(workdir, 5_000 if quick else 50_000, 3 if quick else 7)
        group = await bench_group_commit(workdir, 64, 5 if quick else 20, 3 if quick else 5)
    http = await in_process(500 if quick else 3000, 3 if quick else 9)
    return engine, group, http


def wrk_table(results: dict[str, dict[str, list[dict[str, float]]]]) -> list[str]:
    lines = ["| middleware | route | req/s | p50 ms | p99 ms | errors |", "|---|---|---|---|---|---|"]
    for kind in WRK_CONTENDERS:
        for path in WRK_PATHS:
            runs = results[kind][path]
            if not runs:
                continue
            rps, p50, p99 = (statistics.median(r[m] for r in runs) for m in ("rps", "p50", "p99"))
            lines.append(f"| {LABELS[kind]} | {path} | {rps:,.0f} | {p50:.2f} | {p99:.2f} | "
                         f"{sum(r['errors'] for r in runs):.0f} |")
    return lines


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="small sizes: a smoke run, not a report")
    quick = parser.parse_args().quick
    started = time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())
    engine, group, http = anyio.run(measure, quick)

    wrk = through_uvicorn(5 if quick else 10, 1 if quick else 5, 16)
    store_requests, store_rounds = (200, 1) if quick else (1000, 3)
    stores = stores_bench.measure(store_requests, store_rounds) if stores_bench.available() else None
    med = {k: {p: statistics.median(v) for p, v in routes.items()} for k, routes in http.items()}
    added = added_over_bare(http)
    ours = added["buntsession"]
    set_floor, _, set_db, _, set_lite = engine["set"]
    get_dict, get_db, _ = engine["get"]
    fsync_each, grouped = group

    def versus(path: str) -> str:
        return (f"{ours[path] * 1e6:.1f} µs, {ours[path] / added['starlette'][path]:.2f}× what Starlette's cookie "
                f"middleware adds, {ours[path] / added['starsessions'][path]:.2f}× starsessions', "
                f"{ours[path] / added['floor'][path]:.2f}× the floor")

    headline = [f"- a request that {ROUTES[path]}: buntsession adds {versus(path)};" for path in PATHS]
    update_db = engine["update"][1]
    headline.append(
        f"- `DB.set` {set_db.median * 1e6:.2f} µs = {set_db.median / set_floor.median:.2f}× a minimal async append of "
        f"the same record (frame, `os.write`, dict and expiry heap), {set_lite.median / set_db.median:.1f}× faster "
        f"than sqlite3; `DB.update` (a session write) {update_db.median / set_floor.median:.2f}×; `DB.get` "
        f"{get_db.median / get_dict.median:.2f}× a dict lookup; group commit "
        f"{fsync_each.median / grouped.median:.1f}× one fsync per write.")

    lines = [
        "# Benchmarks", "",
        f"Produced by `benchmarks/report.py` on {started}{' (--quick: a smoke run)' if quick else ''}.",
        f"Machine: {versions()}.", "",
        "Medians over interleaved rounds in one run; min-max is the spread of the rounds. The machine is shared",
        "and noisy: read the ratios, not the absolute times.", "",
        "## Headline", "", *headline, "",
        "## Time each session middleware adds to a request", "",
        "A Starlette app called in-process with `secret_key` set, through the dict API all the middlewares share.",
        "`get` reads a small session (one string), `put` writes it, `incr` reads and writes a counter; `profile`",
        "reads a realistic session (a signed-in user, a cart of five items as a list of dicts, preferences) and",
        "`cart` adds an item to its cart. The floor is a middleware written in the benchmark that does only the",
        "essential work of a signed, durable server-side session (find the cookie, check its HMAC, hash the",
        "token, one dict lookup, `json.loads`; on a change one `json.dumps` and one framed `os.write`), with no",
        "expiry, merge, change tracking or error handling. On this run the floor itself adds "
        + ", ".join(f"{added['floor'][p] / added['starlette'][p]:.2f}× ({p})" for p in PATHS)
        + " of what Starlette's cookie middleware adds. The floor checks the HMAC and hashes the token on every"
        " request; buntsession remembers the cookies it verified and their store keys, so a read can cost it"
        " less than the floor.", "",
        "| middleware | route | median µs | min-max µs | added over none |", "|---|---|---|---|---|",
    ]
    for kind in CONTENDERS:
        for path in PATHS:
            samples = http[kind][path]
            extra = "" if kind == "bare" else f"{added[kind][path] * 1e6:.1f}"
            lines.append(f"| {LABELS[kind]} | {path} | {med[kind][path] * 1e6:.1f} | "
                         f"{min(samples) * 1e6:.1f}-{max(samples) * 1e6:.1f} | {extra} |")
    lines += ["", "## Under a real server", "",
              "Each app under uvicorn (one worker), driven by wrk on loopback (`-t1 -c16`) with one fixed session",
              "cookie made by a first request to `/put`; medians of the rounds.", "", *wrk_table(wrk)]
    lines += ["", "## The engine against its floors and sqlite3", "", "### set (200-byte value with a TTL)", "",
              *series_table(engine["set"], set_floor), "",
              "### update (a session write: `DB.update` with a change function, as `BuntStore.merge` calls it)", "",
              *series_table(engine["update"], set_floor), "", "### get", "", *series_table(engine["get"], get_dict), "",
              "### group commit (sync=\"always\", 64 concurrent writers)", "", *series_table(group, fsync_each), "",
              "![chart](benchmarks.png)", ""]
    if stores is not None:  # Redis and PostgreSQL installed
        lines += [*stores_bench.markdown(stores, store_requests, store_rounds), ""]
    DOCS.mkdir(exist_ok=True)
    target = DOCS / "benchmarks.md"
    kept = other_sections(target.read_text() if target.exists() else "", lines)
    target.write_text("\n".join(lines) + ("\n" + kept if kept else ""))
    chart(added, engine)
    readme = ROOT / "README.md"
    text = readme.read_text()
    block = ("<!-- benchmarks:start -->\n" + "\n".join(headline) +
             f"\n\n![benchmarks](docs/benchmarks.png)\n\nFrom `benchmarks/report.py`, {started}; the tables are in "
             "[docs/benchmarks.md](docs/benchmarks.md).\n<!-- benchmarks:end -->")
    readme.write_text(re.sub(r"<!-- benchmarks:start -->.*?<!-- benchmarks:end -->", lambda _: block, text,
                             flags=re.S))
    print(f"wrote {DOCS / 'benchmarks.md'}, {DOCS / 'benchmarks.png'} and the README's headline", file=sys.stderr)


def other_sections(previous: str, lines: list[str]) -> str:
    """The sections of the previous report that this script does not write: figures from the other
    benchmark scripts (each section names its own command and run), kept as they were."""
    ours = {line for line in lines if line.startswith("## ")}
    kept, keep = [], False
    for line in previous.splitlines():
        if line.startswith("## "):
            keep = line not in ours
        if keep:
            kept.append(line)
    return "\n".join(kept) + ("\n" if kept else "")


def chart(added: dict[str, dict[str, float]], engine: dict[str, list[Series]]) -> None:
    fig, (left, right) = plt.subplots(1, 2, figsize=(13, 4.8))
    kinds = [k for k in CONTENDERS if k != "bare"]
    width = 0.8 / len(kinds)
    for i, kind in enumerate(kinds):
        left.bar([j + i * width for j in range(len(PATHS))], [added[kind][p] * 1e6 for p in PATHS], width,
                 label=LABELS[kind])
    left.set_xticks([j + width * (len(kinds) - 1) / 2 for j in range(len(PATHS))], PATHS)
    left.set_ylabel("µs added per request (median)")
    left.set_title("What each session middleware adds")
    left.legend(fontsize=8)
    rows = [*engine["set"], *engine["get"]]
    right.barh([s.name for s in rows], [s.median * 1e6 for s in rows])
    right.set_xscale("log")
    right.set_xlabel("µs per operation (median, log scale)")
    right.set_title("Engine operations, floors and sqlite3")
    right.tick_params(axis="y", labelsize=7)
    right.invert_yaxis()
    fig.tight_layout()
    fig.savefig(DOCS / "benchmarks.png", dpi=110)


if __name__ == "__main__":
    main()
