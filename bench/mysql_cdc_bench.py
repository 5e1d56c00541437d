#!/usr/bin/env python3
"""Issue 4 benchmark for MariaDB (stdlib only; MariaDB's own binaries). See bench/cdc.sh.

(a) streaming: 1,000,000 changes (500,000 inserts, then 500,000 updates, in transactions of
    10,000) already in the binlog; Sluice reads them from the start of the binlog, against
    mariadb-binlog reading the same binlog from the server and decoding every row (-v) to
    /dev/null. Three alternating rounds (--rounds); the median round's ratio is reported.
(b) snapshot of a 1,000,000-row table, against SELECT ... INTO OUTFILE of it.
(b') the same snapshot between watermarks (watermark_table), the method MySQL needs.
    (b) and (b') run in three alternating rounds with the OUTFILE; the median round's ratio
    is reported.
"""
import argparse, os, shutil, subprocess, sys, tempfile, time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from ingest_bench import free_port  # noqa: E402
from cdc_bench import wait, lag_run, pct, catch_up_round, snapshot_round, cpu_s  # noqa: E402

SECTION = "## Change data capture from MariaDB (issue 4)"


class Maria:
    def __init__(self, work):
        self.dir = os.path.join(work, "maria")
        os.makedirs(self.dir)
        data = os.path.join(self.dir, "data")
        root = ["--user=root"] if os.geteuid() == 0 else []
        subprocess.run(["mariadb-install-db", "--no-defaults", "--auth-root-authentication-method=normal", "--skip-test-db",
                        f"--datadir={data}"] + root, check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        self.port = free_port()
        self.sock = os.path.join(self.dir, "sock")
        self.proc = subprocess.Popen(
            ["mariadbd", "--no-defaults"] + root + [f"--datadir={data}", f"--port={self.port}", "--bind-address=127.0.0.1",
             f"--socket={self.sock}", f"--log-error={self.dir}/error.log", f"--log-bin={data}/binlog", "--binlog-format=ROW",
             "--binlog-row-metadata=FULL", "--server-id=1", "--innodb-flush-log-at-trx-commit=0", "--sync-binlog=0",
             "--innodb-buffer-pool-size=512M", "--max-binlog-size=1G", "--secure-file-priv=", "--default-time-zone=+00:00"],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        wait(lambda: os.path.exists(self.sock), "mariadbd", timeout=60)
        time.sleep(0.5)
        self.sql("CREATE DATABASE bench")
        self.url = f"mysql://root@127.0.0.1:{self.port}/bench"
        self.version = self.sql("SELECT VERSION()")

    def sql(self, q):
        out = subprocess.run(["mariadb", "-u", "root", f"--socket={self.sock}", "-N", "-B", "-e", q], check=True,
                             capture_output=True, text=True)
        return out.stdout.strip()

    def stop(self):
        self.proc.kill()
        self.proc.wait()


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
    work = tempfile.mkdtemp(prefix="sluice-mysqlbench-")
    os.chmod(work, 0o777)
    db = Maria(work)
    half = a.changes // 2
    try:
        # (a) streaming: the changes go into the binlog before Sluice starts (it starts at the
        # binlog's first file, as a resumed source would), so both read a backlog.
        first = db.sql("SHOW BINARY LOGS").splitlines()[0].split("\t")[0]
        db.sql("CREATE TABLE bench.ev (id BIGINT PRIMARY KEY, v VARCHAR(40), n INT)")
        step = 10_000
        for lo in range(0, half, step):
            hi = min(lo + step, half) - 1
            db.sql("SET SESSION max_recursive_iterations = 1000000; "
                   f"INSERT INTO bench.ev WITH RECURSIVE g(i) AS (SELECT {lo} UNION ALL SELECT i + 1 FROM g WHERE i < {hi}) "
                   "SELECT i, CONCAT('value ', i), 0 FROM g")
        for lo in range(0, half, step):
            db.sql(f"UPDATE bench.ev SET n = n + 1, v = CONCAT(v, '!') WHERE id >= {lo} AND id < {min(lo + step, half)}")
        logs = [l.split("\t")[0] for l in db.sql("SHOW BINARY LOGS").splitlines()]
        # Alternating rounds on the same binlog: single runs of either side move by up to
        # a quarter on a shared 2-core machine, so the ratio reported is the median round's.
        rounds = []
        for r in range(a.rounds):
            t = time.monotonic()
            subprocess.run(["mariadb-binlog", "--read-from-remote-server", "-h", "127.0.0.1", "-P", str(db.port), "-u", "root", "-v",
                            "--database=bench"] + logs, check=True, stdout=subprocess.DEVNULL)
            ref = a.changes / (time.monotonic() - t)

            d = os.path.join(work, f"stream{r}")
            os.makedirs(os.path.join(d, "data", "sources", "bench"))
            # Start where the binlog starts (a source remembers its position in this file).
            with open(os.path.join(d, "data", "sources", "bench", "state.json"), "w") as f:
                f.write('{"binlog_file": "%s", "binlog_pos": 4, "tables": {}}' % first)
            cfg = f"lake:\n  flush_interval: 1s\nsources:\n  bench:\n    mysql:\n      url: {db.url}\n      snapshot: never\n"
            rounds.append(catch_up_round(a, d, cfg, ref))
        rounds.sort()
        ratio, streamed, ref, catch_up, mirror_el, stream_rss = rounds[len(rounds) // 2]

        # (b) snapshot
        db.sql("CREATE TABLE bench.snap (id BIGINT PRIMARY KEY, v VARCHAR(40), n INT, at TIMESTAMP(6))")
        for lo in range(1, a.rows + 1, 100_000):
            hi = min(lo + 100_000, a.rows + 1) - 1
            db.sql("SET SESSION max_recursive_iterations = 1000000; "
                   f"INSERT INTO bench.snap WITH RECURSIVE g(i) AS (SELECT {lo} UNION ALL SELECT i + 1 FROM g WHERE i < {hi}) "
                   "SELECT i, CONCAT('value ', i), i % 1000, NOW(6) FROM g")
        db.sql("ANALYZE TABLE bench.snap")
        # Alternating rounds, as in (a): OUTFILE, then (b) as MariaDB allows (each chunk at its
        # consistent read's binlog position), then (b') between watermarks, the way MySQL
        # needs (watermark_table). Each ratio is to the OUTFILE of its round; the median
        # round's is reported.
        snaps = {"position": [], "watermarks": []}
        # What MariaDB's own client gets reading the table over the wire and discarding the
        # rows (--quick: row by row, as Sluice reads): the whole table in one SELECT, and in
        # the chunks Sluice reads (16,384 rows in key order after the last chunk's key; the
        # ids are 1..rows), with the CPU seconds the client and the server spent on it.
        reader = ["mariadb", "-u", "root", "-h", "127.0.0.1", f"--port={db.port}", "--quick", "-N", "-B", "-e"]
        chunked = "; ".join(f"SELECT * FROM bench.snap WHERE (id) > ({k}) ORDER BY id LIMIT 16384" for k in range(0, a.rows, 16384))
        floors, outfile_s = [], []
        for r in range(a.rounds):
            out = os.path.join(work, f"outfile{r}.tsv")
            t = time.monotonic()
            db.sql(f"SELECT * INTO OUTFILE '{out}' FROM bench.snap")
            copy = a.rows / (time.monotonic() - t)
            outfile_s.append(a.rows / copy)
            os.remove(out)
            floor = []
            for q in ("SELECT * FROM bench.snap", chunked):
                t, server = time.monotonic(), cpu_s(db.proc.pid)
                p = subprocess.Popen(reader + [q], stdout=subprocess.DEVNULL)
                _, status, usage = os.wait4(p.pid, 0)
                if status != 0:
                    raise SystemExit(f"mariadb exited with status {status} reading the table")
                floor.append((a.rows / (time.monotonic() - t) / copy, usage.ru_utime + usage.ru_stime, cpu_s(db.proc.pid) - server))
            floors.append(floor)
            for method, extra in [("position", ""), ("watermarks", "      watermark_table: bench.sluice_watermark\n")]:
                d = os.path.join(work, f"snap_{method}{r}"); os.makedirs(d)
                cfg = (f"lake:\n  flush_interval: 1s\nsources:\n  snap:\n    mysql:\n      url: {db.url}\n      snapshot_chunk: 16384\n"
                       f"      tables:\n        include: [bench.snap]\n{extra}")
                snapped, mirror_after, rss, cpu, dbc, own = snapshot_round(a, d, cfg, "bench.snap", lambda: {db.proc.pid: cpu_s(db.proc.pid)})
                snaps[method].append((snapped / copy, snapped, copy, mirror_after, rss, cpu, dbc, own))
        for v in snaps.values():
            v.sort()
        med = {m: v[len(v) // 2] for m, v in snaps.items()}
        own = {m: sorted((r[7] / r[2], r[7], r[2]) for r in v)[len(v) // 2] for m, v in snaps.items()}

        # (c) mirror lag at a steady change rate
        db.sql("CREATE TABLE bench.lag (id BIGINT PRIMARY KEY, v VARCHAR(40), n INT)")
        cfg = f"    mysql:\n      url: {db.url}\n      snapshot: never\n      tables:\n        include: [bench.lag]\n"
        client = ["mariadb", "-u", "root", f"--socket={db.sock}", "bench"]
        tick = lambda lo, n, old: (f"BEGIN; INSERT INTO lag SELECT seq, CONCAT('v', seq), 0 FROM seq_{lo}_to_{lo + n - 1}; "
                                   f"UPDATE lag SET n = n + 1 WHERE id >= {old} AND id < {old + n}; COMMIT;")
        lags, lag_rate, lag_rss = lag_run(a, work, cfg, client, tick, "lag_lag")
    finally:
        db.stop()
        shutil.rmtree(work, ignore_errors=True)

    lines = [SECTION, "",
             f"`bash bench/cdc.sh` (binary `{a.bin}`; {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}; MariaDB {db.version} "
             "started by the script, binlog ROW with full metadata, sync_binlog=0). Sluice and the reference read the same "
             "binlog in the same run.", "",
             "| measurement | Sluice | reference | ratio | target |", "|---|---:|---:|---:|---:|",
             f"| (a) streaming {a.changes:,} changes ({half:,} inserts, {half:,} updates, transactions of 10,000) into the log, changes/s | "
             f"{streamed:,.0f} | {ref:,.0f} (mariadb-binlog --read-from-remote-server -v, to /dev/null) | {ratio:.2f}x | >= 0.9x |",
             f"| (b) snapshot of {a.rows:,} rows (chunks of 16,384) into the log, rows/s from Sluice's start | {med['position'][1]:,.0f} | "
             f"{med['position'][2]:,.0f} (SELECT * INTO OUTFILE) | {med['position'][0]:.2f}x | >= 0.8x |",
             f"| (b) the same, rows/s by the snapshot's own clock (queued to done, `GET /v1/sources`) | {own['position'][1]:,.0f} | "
             f"{own['position'][2]:,.0f} (the same) | {own['position'][0]:.2f}x | >= 0.8x |",
             f"| (b') the same snapshot between watermarks (`watermark_table`, as MySQL needs), rows/s from Sluice's start | {med['watermarks'][1]:,.0f} | "
             f"{med['watermarks'][2]:,.0f} (SELECT * INTO OUTFILE) | {med['watermarks'][0]:.2f}x | >= 0.8x |",
             f"| (b') the same, rows/s by the snapshot's own clock | {own['watermarks'][1]:,.0f} | "
             f"{own['watermarks'][2]:,.0f} (the same) | {own['watermarks'][0]:.2f}x | >= 0.8x |",
             f"| (c) mirror lag at a steady {lag_rate:,.0f} changes/s (half inserts, half updates, 100 transactions/s, "
             f"`flush_interval: {a.lag_flush}`) for {a.lag_seconds} s: p50 / p99 / max, s | {pct(lags, 0.5):.2f} / {pct(lags, 0.99):.2f} / "
             f"{max(lags):.2f} | | | p99 <= 1 s |", "",
             f"- (a) the median of {len(rounds)} alternating rounds (the reference, then Sluice, on the same binlog); the rounds' ratios: "
             + ", ".join(f"{r[0]:.2f}x ({r[1]:,.0f} vs {r[2]:,.0f})" for r in rounds)
             + f". In the median round the mirror table had caught up {catch_up:.1f} s after the last change reached the log "
             f"({mirror_el:.1f} s from start); peak RSS {stream_rss:,.0f} MiB.",
             f"- (b), (b') the median of {a.rounds} alternating rounds (OUTFILE, (b), (b')), each ratio to its round's OUTFILE; the rounds' "
             "ratios: (b) " + ", ".join(f"{r[0]:.2f}x ({r[1]:,.0f} vs {r[2]:,.0f})" for r in snaps["position"])
             + "; (b') " + ", ".join(f"{r[0]:.2f}x ({r[1]:,.0f} vs {r[2]:,.0f})" for r in snaps["watermarks"])
             + "; by the snapshot's own clock (b) " + ", ".join(f"{r[7] / r[2]:.2f}x" for r in snaps["position"])
             + ", (b') " + ", ".join(f"{r[7] / r[2]:.2f}x" for r in snaps["watermarks"])
             + " (the rest of the time from start is Sluice starting: the process, its log, connecting)"
             + f". In the median rounds the mirror held all rows {med['position'][3]:.1f} s ((b') {med['watermarks'][3]:.1f} s) after the "
             f"snapshot finished; peak RSS {med['position'][4]:,.0f} MiB ((b') {med['watermarks'][4]:,.0f} MiB). Until (b) was done "
             f"Sluice used {med['position'][5]:.2f} CPU-s (capture, and landing in the mirror on what CPU was left) and mariadbd "
             f"{med['position'][6]:.2f} CPU-s, on 2 cores. MariaDB's own client (mariadb --quick, rows to /dev/null) read the table "
             "over the wire at " + ", ".join(f"{f[0][0]:.2f}x" for f in floors) + " of the round's OUTFILE in one SELECT, and at "
             + ", ".join(f"{f[1][0]:.2f}x" for f in floors) + " in Sluice's chunks; for the chunks the client used "
             + ", ".join(f"{f[1][1]:.2f}" for f in floors) + " CPU-s and mariadbd " + ", ".join(f"{f[1][2]:.2f}" for f in floors)
             + " CPU-s (its OUTFILE: " + ", ".join(f"{c:.2f} s" for c in outfile_s) + ").",
             f"- (c) lag of each inserted row, from handing its transaction to the mariadb client to the end of the first query "
             f"(polling every 50 ms) that saw it in the mirror; {len(lags):,} rows; peak RSS {lag_rss:,.0f} MiB.",
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
