#!/usr/bin/env python3
"""Issue 4 benchmark driver (stdlib only; PostgreSQL's own binaries). See bench/cdc.sh.

(a) streaming: 1,000,000 changes (500,000 inserts, then 500,000 updates, in transactions of
    10,000) already in the WAL; Sluice catches up from its slot, against pg_recvlogical
    decoding the same WAL with pgoutput to /dev/null from a second slot made at the same
    point. Three alternating rounds (--rounds), each side from its own slot; the median
    round's ratio is reported.
(b) initial snapshot of a 1,000,000-row table, against COPY (SELECT ...) TO STDOUT of it; three
    alternating rounds (--rounds), the median round's ratio reported.
"""
import argparse, datetime, glob, os, shutil, subprocess, sys, tempfile, threading, time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from ingest_bench import Sluice, free_port  # noqa: E402

SECTION = "## Change data capture (issue 4)"


def pg_bin():
    dirs = sorted(glob.glob("/usr/lib/postgresql/*/bin"))
    if not dirs:
        raise SystemExit("PostgreSQL server binaries not found under /usr/lib/postgresql/*/bin")
    return dirs[-1]


def as_pg(cmd):
    return (["runuser", "-u", "postgres", "--"] + cmd) if os.geteuid() == 0 else cmd


class Pg:
    def __init__(self, work):
        self.bin = pg_bin()
        self.dir = os.path.join(work, "pg")
        os.makedirs(self.dir)
        if os.geteuid() == 0:
            subprocess.run(["chown", "-R", "postgres:postgres", work], check=True)
        data = os.path.join(self.dir, "data")
        subprocess.run(as_pg([f"{self.bin}/initdb", "-A", "trust", "-U", "postgres", "--no-sync", "-D", data]),
                       check=True, stdout=subprocess.DEVNULL)
        self.port = free_port()
        opts = (f"-p {self.port} -k {self.dir} -c listen_addresses=127.0.0.1 -c wal_level=logical -c max_wal_senders=10 "
                "-c max_replication_slots=10 -c shared_buffers=256MB -c max_wal_size=4GB -c synchronous_commit=off")
        subprocess.run(as_pg([f"{self.bin}/pg_ctl", "-w", "-l", os.path.join(self.dir, "log"), "-o", opts, "-D", data, "start"]),
                       check=True, stdout=subprocess.DEVNULL)
        self.data = data
        self.url = f"postgres://postgres@127.0.0.1:{self.port}/postgres"

    def sql(self, q):
        out = subprocess.run([f"{self.bin}/psql", "-X", "-q", "-At", "-h", "127.0.0.1", "-p", str(self.port), "-U", "postgres",
                              "-d", "postgres", "-c", q], check=True, capture_output=True, text=True)
        return out.stdout.strip()

    def stop(self):
        subprocess.run(as_pg([f"{self.bin}/pg_ctl", "-m", "immediate", "-D", self.data, "stop"]), stdout=subprocess.DEVNULL)


TICK = os.sysconf("SC_CLK_TCK")


def cpu_s(pid, children=False):
    """CPU seconds (user + system) process `pid` has used so far (`children`: with those of
    its children that ended); 0 once it is gone."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()
        return sum(int(f) for f in fields[11:15 if children else 13]) / TICK
    except (OSError, ValueError, IndexError):
        return 0.0


def named_cpu_s(comm):
    """{pid: CPU seconds used so far} of the live processes named `comm` (a server's), each
    with its children that ended (PostgreSQL's postmaster: backends of connections closed)."""
    out = {}
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            with open(f"/proc/{pid}/comm") as f:
                if f.read().strip() == comm:
                    out[pid] = cpu_s(pid, children=True)
        except OSError:
            pass
    return out


def cpu_since(now, before):
    """CPU seconds used between two `named_cpu_s`-like samples: a process that ended in
    between is counted in its parent's ended children (PostgreSQL's postmaster), so the
    totals are compared, not process by process."""
    return sum(now.values()) - sum(before.values())


def snap_table(pg, rows, chunks, chunk=16384):
    """Creates (b)'s table `snap` of `rows` rows (ids 1..rows) and writes to file `chunks` the
    psql script of the COPYs a snapshot of it reads (binary, `chunk` rows in key order after
    the last chunk's key), each to /dev/null: the database's own part of the snapshot."""
    pg.sql("CREATE TABLE snap (id bigint PRIMARY KEY, v text, n int, at timestamptz)")
    pg.sql(f"INSERT INTO snap SELECT g, 'value ' || g, g % 1000, now() FROM generate_series(1, {rows}) g")
    pg.sql("VACUUM ANALYZE snap")
    with open(chunks, "w") as f:
        for k in range(0, rows, chunk):
            f.write("\\copy (SELECT t.id::pg_catalog.int8, t.v::pg_catalog.text, t.n::pg_catalog.int4, t.at::pg_catalog.timestamptz "
                    f"FROM public.snap t WHERE (t.id) > ({k}) ORDER BY t.id LIMIT {chunk}) TO '/dev/null' (FORMAT binary)\n")


def wait(pred, what, timeout=1800):
    t = time.monotonic()
    while not pred():
        if time.monotonic() - t > timeout:
            raise SystemExit(f"timed out waiting for {what}")
        time.sleep(0.01)


def source(s):
    return s.get("/v1/sources")["sources"][0]


def catch_up_round(a, d, cfg, ref):
    """One round of (a): Sluice started in `d` with `cfg` catches up on the changes to table
    `ev` (half inserts, half updates of `n`). (ratio to `ref`, changes/s into the log, ref,
    seconds from the last change in the log to the mirror caught up, seconds from start to
    the mirror caught up, peak RSS MiB)."""
    t = time.monotonic()
    s = Sluice(a.bin, d, cfg)
    # Durable in the log (its end offset is the high watermark), not just decoded.
    wait(lambda: (s.stream("bench_ev") or {}).get("log_end_offset", 0) >= a.changes, "the changes in the log")
    el = time.monotonic() - t
    wait(lambda: (s.stream("bench_ev") or {}).get("lag", 1) == 0, "the mirror")
    mirror_el = time.monotonic() - t
    half = a.changes // 2
    row = s.query("SELECT count(*) AS n, sum(n) AS u FROM bench_ev")[0]
    assert row["n"] == half and row["u"] == half, row
    out = (a.changes / el / ref, a.changes / el, ref, mirror_el - el, mirror_el, s.peak_rss_mib())
    s.stop()
    shutil.rmtree(d, ignore_errors=True)
    return out


def snapshot_round(a, d, cfg, table, db_cpu):
    """One snapshot round of (b): Sluice started in `d` with `cfg` snapshots `table` (a.rows
    rows, mirrored as snap_snap). (rows/s into the log from Sluice's start, seconds from the
    snapshot done to the mirror complete, peak RSS MiB, CPU seconds Sluice used until the
    snapshot was done and the database server's processes meanwhile (`db_cpu()`: {pid: CPU
    seconds so far}), rows/s by the snapshot's own clock (`snapshot_seconds`)); `d` is
    removed."""
    t = time.monotonic()
    db0 = db_cpu()
    s = Sluice(a.bin, d, cfg)
    done = lambda: any(j.get("state") == "done" and j.get("table") == table for j in source(s).get("snapshots", []))
    wait(done, "the snapshot")
    snap_el = time.monotonic() - t
    cpu, db = cpu_s(s.proc.pid), cpu_since(db_cpu(), db0)
    own = snapshot_seconds(s, table)
    wait(lambda: (s.stream("snap_snap") or {}).get("lag", 1) == 0, "the snapshot's mirror")
    mirror_el = time.monotonic() - t
    assert s.query("SELECT count(*) AS n FROM snap_snap")[0]["n"] == a.rows
    rss = s.peak_rss_mib()
    s.stop()
    shutil.rmtree(d, ignore_errors=True)
    return a.rows / snap_el, mirror_el - snap_el, rss, cpu, db, a.rows / own


def snapshot_seconds(s, table):
    """The snapshot of `table` by its own clock: from queued (`started`, once the source is
    connected and its slot or binlog position taken) to its last chunk durable in the log
    (`finished`), as `GET /v1/sources` shows them. Without Sluice's start (process, log,
    connecting, making the slot), which the time from start includes."""
    j = next(j for j in source(s)["snapshots"] if j.get("state") == "done" and j.get("table") == table)
    ts = lambda v: datetime.datetime.fromisoformat(v.replace("Z", "+00:00")).timestamp()
    return ts(j["finished"]) - ts(j["started"])


def pct(xs, q):
    xs = sorted(xs)
    return xs[min(len(xs) - 1, int(q * len(xs)))] if xs else float("nan")


def steady_lag(s, client, tick_sql, table, rate, seconds):
    """Writes `rate` changes/s for `seconds` through `client` (psql or mariadb reading SQL on
    stdin): every 10 ms a transaction, `tick_sql(lo, n, old)`, inserting n = rate/200 new rows
    from id lo and updating the n from id old. Polls the mirror `table` for its newest id
    every 50 ms. Returns the lag (s) of
    every inserted row: from the moment its transaction was handed to the client to the end
    of the first query that saw it."""
    per_tick = max(1, rate // 200)
    written = {}
    proc = subprocess.Popen(client, stdin=subprocess.PIPE, stdout=subprocess.DEVNULL, text=True)
    stop = threading.Event()
    seen = []

    def watch():
        while True:
            try:
                m = s.query(f"SELECT max(id) AS m FROM {table}")[0]["m"]
            except Exception:
                time.sleep(0.02); continue
            seen.append((time.monotonic(), m if m is not None else -1))
            if stop.is_set() and (not written or seen[-1][1] >= max(written)):
                return
            time.sleep(0.05)

    w = threading.Thread(target=watch); w.start()
    t0 = time.monotonic()
    tick = 0
    while time.monotonic() - t0 < seconds:
        d = t0 + tick * 0.01 - time.monotonic()
        if d > 0:
            time.sleep(d)
        lo = tick * per_tick
        old = max(0, lo - 50 * per_tick)
        proc.stdin.write(tick_sql(lo, per_tick, old) + "\n")
        proc.stdin.flush()
        now = time.monotonic()
        for i in range(lo, lo + per_tick):
            written[i] = now
        tick += 1
    proc.stdin.close(); proc.wait()
    stop.set(); w.join(timeout=120)
    lags, j = [], 0
    for i in sorted(written):
        while j < len(seen) and seen[j][1] < i:
            j += 1
        if j == len(seen):
            break
        lags.append(seen[j][0] - written[i])
    return lags, tick * per_tick / (time.monotonic() - t0)


def lag_run(a, work, source_yaml, client, tick_sql, table):
    """(c) for one database: a Sluice with `source_yaml` (the source `lag`, indented under
    `sources:`) and `flush_interval: --lag-flush`, then `steady_lag`. Returns (lags,
    changes/s reached, peak RSS MiB)."""
    d = os.path.join(work, "lag"); os.makedirs(d)
    s = Sluice(a.bin, d, f"lake:\n  flush_interval: {a.lag_flush}\nsources:\n  lag:\n{source_yaml}")
    try:
        wait(lambda: source(s).get("state") == "streaming", "the source")
        lags, rate = steady_lag(s, client, tick_sql, table, a.lag_rate, a.lag_seconds)
        return lags, rate, s.peak_rss_mib()
    finally:
        s.stop()


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--bin", required=True)
    ap.add_argument("--changes", type=int, default=1_000_000)
    ap.add_argument("--rows", type=int, default=1_000_000)
    ap.add_argument("--lag-rate", type=int, default=10_000)
    ap.add_argument("--lag-seconds", type=int, default=20)
    ap.add_argument("--lag-flush", default="250ms")
    ap.add_argument("--rounds", type=int, default=3, help="alternating rounds of (a)")
    ap.add_argument("--out", default="bench/RESULTS.md")
    a = ap.parse_args()
    work = tempfile.mkdtemp(prefix="sluice-cdcbench-")
    os.chmod(work, 0o777)
    pg = Pg(work)
    half = a.changes // 2
    try:
        # (a) streaming
        pg.sql("CREATE TABLE ev (id bigint PRIMARY KEY, v text, n int)")
        pg.sql("CREATE PUBLICATION pub FOR ALL TABLES")
        # A slot per round and side, all at the same point: each round reads the same WAL.
        for r in range(a.rounds):
            pg.sql(f"SELECT pg_create_logical_replication_slot('sluice_bench{r}', 'pgoutput')")
            pg.sql(f"SELECT pg_create_logical_replication_slot('ref{r}', 'pgoutput')")
        step = 10_000
        for lo in range(0, half, step):
            pg.sql(f"INSERT INTO ev SELECT g, 'value ' || g, 0 FROM generate_series({lo}, {min(lo + step, half) - 1}) g")
        for lo in range(0, half, step):
            pg.sql(f"UPDATE ev SET n = n + 1, v = v || '!' WHERE id >= {lo} AND id < {min(lo + step, half)}")
        end = pg.sql("SELECT pg_current_wal_lsn()")
        # Alternating rounds: single runs of either side move by up to a quarter on a shared
        # 2-core machine, so the ratio reported is the median round's.
        rounds = []
        for r in range(a.rounds):
            t = time.monotonic()
            subprocess.run([f"{pg.bin}/pg_recvlogical", "-h", "127.0.0.1", "-p", str(pg.port), "-U", "postgres", "-d", "postgres",
                            "-S", f"ref{r}", "--start", "-o", "proto_version=1", "-o", "publication_names=pub", "-E", end, "-f", "/dev/null"],
                           check=True)
            ref = a.changes / (time.monotonic() - t)

            d = os.path.join(work, f"stream{r}"); os.makedirs(d)
            cfg = (f"lake:\n  flush_interval: 1s\nsources:\n  bench:\n    postgres:\n      url: {pg.url}\n      slot: sluice_bench{r}\n"
                   "      publication: pub\n      snapshot: never\n")
            rounds.append(catch_up_round(a, d, cfg, ref))
        rounds.sort()
        ratio, streamed, ref, catch_up, mirror_el, stream_rss = rounds[len(rounds) // 2]

        # (b) snapshot
        # With the server's own part of a snapshot: the COPY of each chunk Sluice reads, from psql.
        chunks = os.path.join(work, "chunks.sql")
        snap_table(pg, a.rows, chunks)
        psql = [f"{pg.bin}/psql", "-X", "-q", "-h", "127.0.0.1", "-p", str(pg.port), "-U", "postgres", "-d", "postgres"]
        # Alternating rounds, as in (a): a snapshot takes ~2 s, and single runs of either side
        # moved by a third on the shared machine. Each Sluice round makes its own slot.
        snap_rounds = []
        for r in range(a.rounds):
            t = time.monotonic()
            subprocess.run(psql + ["-c", "\\copy (SELECT * FROM snap) TO '/dev/null'"], check=True)
            copy = a.rows / (time.monotonic() - t)
            t = time.monotonic()
            subprocess.run(psql + ["-f", chunks], check=True)
            floor = a.rows / (time.monotonic() - t)
            d = os.path.join(work, f"snap{r}"); os.makedirs(d)
            cfg = (f"lake:\n  flush_interval: 1s\nsources:\n  snap:\n    postgres:\n      url: {pg.url}\n      slot: sluice_snap{r}\n"
                   "      publication: pub\n      snapshot_chunk: 16384\n      tables:\n        include: [public.snap]\n")
            snapped, mirror_after, rss, cpu, db, own = snapshot_round(a, d, cfg, "public.snap", lambda: named_cpu_s("postgres"))
            pg.sql(f"SELECT pg_drop_replication_slot('sluice_snap{r}')")
            snap_rounds.append((snapped / copy, snapped, copy, mirror_after, rss, floor, cpu, db, own))
        snap_rounds.sort()
        snap_ratio, snapped, copy, snap_mirror_after, snap_rss, floor, snap_cpu, snap_db, _ = snap_rounds[len(snap_rounds) // 2]
        own_ratio, own, own_copy = sorted((r[8] / r[2], r[8], r[2]) for r in snap_rounds)[len(snap_rounds) // 2]

        # (c) mirror lag at a steady change rate
        pg.sql("CREATE TABLE lag (id bigint PRIMARY KEY, v text, n int)")
        cfg = (f"    postgres:\n      url: {pg.url}\n      slot: sluice_lag\n"
               "      publication: pub\n      snapshot: never\n      tables:\n        include: [public.lag]\n")
        tick = lambda lo, n, old: (f"BEGIN; INSERT INTO lag SELECT g, 'v' || g, 0 FROM generate_series({lo}, {lo + n - 1}) g; "
                                   f"UPDATE lag SET n = n + 1 WHERE id >= {old} AND id < {old + n}; COMMIT;")
        lags, lag_rate, lag_rss = lag_run(a, work, cfg, psql, tick, "lag_lag")
    finally:
        pg.stop()
        shutil.rmtree(work, ignore_errors=True)

    lines = [SECTION, "",
             f"`bash bench/cdc.sh` (binary `{a.bin}`; {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}; PostgreSQL "
             f"{os.path.basename(os.path.dirname(pg.bin))} started by the script, synchronous_commit off). Sluice and "
             "the reference read the same WAL in the same run.", "",
             "| measurement | Sluice | reference | ratio | target |", "|---|---:|---:|---:|---:|",
             f"| (a) streaming {a.changes:,} changes ({half:,} inserts, {half:,} updates, transactions of 10,000) into the log, changes/s | "
             f"{streamed:,.0f} | {ref:,.0f} (pg_recvlogical, pgoutput, to /dev/null) | {ratio:.2f}x | >= 0.9x |",
             f"| (b) initial snapshot of {a.rows:,} rows (chunks of 16,384) into the log, rows/s from Sluice's start | {snapped:,.0f} | "
             f"{copy:,.0f} (psql \\copy (SELECT ...) TO /dev/null) | {snap_ratio:.2f}x | >= 0.8x |",
             f"| (b) the same, rows/s by the snapshot's own clock (queued to done, `GET /v1/sources`) | {own:,.0f} | "
             f"{own_copy:,.0f} (the same) | {own_ratio:.2f}x | >= 0.8x |",
             f"| (c) mirror lag at a steady {lag_rate:,.0f} changes/s (half inserts, half updates, 100 transactions/s, "
             f"`flush_interval: {a.lag_flush}`) for {a.lag_seconds} s: p50 / p99 / max, s | {pct(lags, 0.5):.2f} / {pct(lags, 0.99):.2f} / "
             f"{max(lags):.2f} | | | p99 <= 1 s |", "",
             f"- (a) the median of {len(rounds)} alternating rounds (the reference, then Sluice, each from its own slot made at the same "
             "point); the rounds' ratios: " + ", ".join(f"{r[0]:.2f}x ({r[1]:,.0f} vs {r[2]:,.0f})" for r in rounds)
             + f". In the median round the mirror table had caught up {catch_up:.1f} s after the last change reached the log "
             f"({mirror_el:.1f} s from start); peak RSS {stream_rss:,.0f} MiB. This is catch-up of a backlog; (c) is the lag of a steady stream.",
             f"- (b) the median of {len(snap_rounds)} alternating rounds (COPY, then Sluice with a new slot); the rounds' ratios: "
             + ", ".join(f"{r[0]:.2f}x ({r[1]:,.0f} vs {r[2]:,.0f})" for r in snap_rounds)
             + "; by the snapshot's own clock " + ", ".join(f"{r[8] / r[2]:.2f}x" for r in snap_rounds)
             + " (the rest of the time from start is Sluice starting: the process, its log, connecting, making the slot)"
             + f". In the median round the mirror held all rows {snap_mirror_after:.1f} s after the snapshot finished; peak RSS {snap_rss:,.0f} MiB. "
             f"Until the snapshot was done Sluice used {snap_cpu:.2f} CPU-s (capture, and landing in the mirror on what CPU was left) and "
             f"PostgreSQL's processes {snap_db:.2f} CPU-s, on 2 cores. The server's own part, the same {-(-a.rows // 16384)} chunk COPYs "
             f"(binary, by key) sent by psql to /dev/null, ran at {floor:,.0f} rows/s ({floor / copy:.2f}x of COPY) in that round.",
             f"- (c) lag of each inserted row, from handing its transaction to psql to the end of the first query (polling every 50 ms) "
             f"that saw it in the mirror; {len(lags):,} rows; peak RSS {lag_rss:,.0f} MiB.",
             ""]
    text = "\n".join(lines)
    print(text)
    old = open(a.out).read() if os.path.exists(a.out) else ""
    if SECTION in old:
        start = old.index(SECTION)
        end = old.find("\n## ", start + len(SECTION))
        old = old[:start] + (old[end + 1:] if end >= 0 else "")
    with open(a.out, "w") as f:
        f.write(old.rstrip("\n") + "\n\n" + text)


if __name__ == "__main__":
    main()
