#!/usr/bin/env python3
"""A/B of PostgreSQL snapshots between Sluice builds or settings (stdlib only; PostgreSQL's own
binaries). The official figures come from bench/cdc.sh; this is for telling two builds apart
on a noisy machine, where a single run of either side moves by a third.

One PostgreSQL, one table like bench/cdc_bench.py's (b) (id bigint key, text, int,
timestamptz; --rows rows). Each round runs psql's whole-table COPY (the reference), the same
chunk COPYs Sluice sends from psql (the database's own part), then every variant in turn,
each with a new slot: a snapshot in chunks of 16,384 rows with the lake flushing every
second, as in (b). Per variant and round it prints the seconds from start to the snapshot
done (and by the snapshot's own clock, queued to done), Sluice's CPU seconds then and PostgreSQL's meanwhile, the seconds until the mirror held
every row and Sluice's CPU seconds then; at the end the medians.

    python3 bench/snapshot_ab.py --variant old=/tmp/bins/old --variant new=/tmp/bins/new \\
        --variant nolake=/tmp/bins/new@nolake --rounds 6

A variant is NAME=BINARY, optionally followed by @ and comma-separated settings:
`nolake` (`lake: enabled: false`), `flush=DURATION` (the lake's flush_interval),
`codec=CODEC` (the table stream's codec), `malloc=OPTS` (jemalloc options for that process,
`+` between them, e.g. `malloc=narenas:1+dirty_decay_ms:-1`), `env=NAME:VALUE` (environment
variables for that process, `+` between them). --log DIR keeps each run's
server log with the sources' debug logging (per chunk: read, select, high watermark).
"""
import argparse, os, shutil, statistics, subprocess, sys, tempfile, time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from ingest_bench import Sluice  # noqa: E402
from cdc_bench import Pg, wait, source, cpu_s, cpu_since, named_cpu_s, snap_table, snapshot_seconds  # noqa: E402

CHUNK = 16384


def variant(spec):
    name, _, rest = spec.partition("=")
    binary, _, opts = rest.partition("@")
    if not name or not binary:
        raise argparse.ArgumentTypeError(f"{spec!r}: want NAME=BINARY[@setting,...]")
    settings = {}
    for o in filter(None, opts.split(",")):
        k, _, v = o.partition("=")
        if k not in ("nolake", "flush", "codec", "malloc", "env"):
            raise argparse.ArgumentTypeError(f"{spec!r}: unknown setting {k!r}")
        settings[k] = v
    return name, binary, settings


def config(pg, slot, settings):
    lake = "lake:\n  enabled: false\n" if "nolake" in settings else f"lake:\n  flush_interval: {settings.get('flush', '1s')}\n"
    streams = f"streams:\n  snap_snap:\n    codec: {settings['codec']}\n" if "codec" in settings else ""
    return (lake + streams + f"sources:\n  snap:\n    postgres:\n      url: {pg.url}\n      slot: {slot}\n"
            f"      publication: pub\n      snapshot_chunk: {CHUNK}\n      tables:\n        include: [public.snap]\n")


def run(a, pg, work, name, binary, settings, r):
    d = os.path.join(work, f"{name}{r}")
    os.makedirs(d)
    env_before = dict(os.environ)
    if "malloc" in settings:
        os.environ["_RJEM_MALLOC_CONF"] = settings["malloc"].replace("+", ",")
    if "env" in settings:
        for kv in settings["env"].split("+"):
            k, _, v = kv.partition(":")
            os.environ[k] = v
    if a.log:
        os.environ["SLUICE_LOG"] = "info,sluice_connect=debug"
    try:
        t, pg0 = time.monotonic(), named_cpu_s("postgres")
        s = Sluice(binary, d, config(pg, f"ab_{name}{r}", settings))
    finally:
        os.environ.clear()
        os.environ.update(env_before)
    done = lambda: any(j.get("state") == "done" for j in source(s).get("snapshots", []))
    wait(done, "the snapshot")
    snap = time.monotonic() - t
    own = snapshot_seconds(s, "public.snap")
    cpu = cpu_s(s.proc.pid)
    pgc = cpu_since(named_cpu_s("postgres"), pg0)
    mirror, total = float("nan"), cpu
    if "nolake" not in settings:
        wait(lambda: (s.stream("snap_snap") or {}).get("lag", 1) == 0, "the mirror")
        mirror, total = time.monotonic() - t - snap, cpu_s(s.proc.pid)
        n = s.query("SELECT count(*) AS n FROM snap_snap")[0]["n"]
        assert n == a.rows, f"{name}: the mirror holds {n} rows, not {a.rows}"
    s.stop()
    if a.log:
        os.makedirs(a.log, exist_ok=True)
        shutil.copy(os.path.join(d, "server.log"), os.path.join(a.log, f"{name}-{r}.log"))
    pg.sql(f"SELECT pg_drop_replication_slot('ab_{name}{r}')")
    shutil.rmtree(d, ignore_errors=True)
    return snap, own, cpu, pgc, mirror, total


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--variant", type=variant, action="append", required=True)
    ap.add_argument("--rows", type=int, default=1_000_000)
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--log", help="keep each run's server log (sources at debug) in this directory")
    a = ap.parse_args()
    work = tempfile.mkdtemp(prefix="sluice-snapshot-ab-")
    pg = Pg(work)
    try:
        pg.sql("CREATE PUBLICATION pub FOR ALL TABLES")
        chunks = os.path.join(work, "chunks.sql")
        snap_table(pg, a.rows, chunks, CHUNK)
        psql = [f"{pg.bin}/psql", "-X", "-q", "-h", "127.0.0.1", "-p", str(pg.port), "-U", "postgres", "-d", "postgres"]
        results = {name: [] for name, _, _ in a.variant}
        copies, floors = [], []
        for r in range(a.rounds):
            t = time.monotonic()
            subprocess.run(psql + ["-c", "\\copy (SELECT * FROM snap) TO '/dev/null'"], check=True)
            copies.append(time.monotonic() - t)
            t = time.monotonic()
            subprocess.run(psql + ["-f", chunks], check=True)
            floors.append(time.monotonic() - t)
            print(f"round {r}: COPY {copies[-1]:.3f} s, the chunk COPYs from psql {floors[-1]:.3f} s", flush=True)
            for name, binary, settings in a.variant:
                snap, own, cpu, pgc, mirror, total = run(a, pg, work, name, binary, settings, r)
                results[name].append((snap, cpu, pgc, mirror, total, own))
                print(f"round {r} {name}: snapshot {snap:.3f} s ({copies[-1] / snap:.2f}x COPY; by its own clock {own:.3f} s, "
                      f"{copies[-1] / own:.2f}x), CPU {cpu:.2f} s, PostgreSQL "
                      f"{pgc:.2f} s; mirror {mirror:.2f} s later, CPU {total:.2f} s", flush=True)
        med = statistics.median
        print(f"median COPY {med(copies):.3f} s, chunk COPYs {med(floors):.3f} s")
        for name, rs in results.items():
            col = lambda i: med(x[i] for x in rs)
            print(f"median {name}: snapshot {col(0):.3f} s (own clock {col(5):.3f} s), CPU {col(1):.2f} s, PostgreSQL {col(2):.2f} s; "
                  f"mirror {col(3):.2f} s later, CPU {col(4):.2f} s")
    finally:
        pg.stop()
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
