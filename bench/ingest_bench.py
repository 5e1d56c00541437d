#!/usr/bin/env python3
"""Issue 2 benchmark driver (stdlib + duckdb). See bench/ingest.sh."""
import argparse, json, os, platform, shutil, signal, socket, subprocess, sys, tempfile, threading, time
import urllib.request

HERE = os.path.dirname(os.path.abspath(__file__))
GEN = os.path.join(HERE, "..", "..", "shared", "bench", "gen_events.py")


def free_port():
    s = socket.socket(); s.bind(("127.0.0.1", 0)); p = s.getsockname()[1]; s.close(); return p


class Sluice:
    def __init__(self, binary, workdir, extra=""):
        self.port = free_port()
        self.dir = workdir
        cfg = os.path.join(workdir, "sluice.yaml")
        with open(cfg, "w") as f:
            f.write(f"listen: 127.0.0.1:{self.port}\ndata_dir: {workdir}/data\n{extra}")
        self.proc = subprocess.Popen([binary, "up", "-c", cfg], stdout=subprocess.DEVNULL,
                                     stderr=open(os.path.join(workdir, "server.log"), "w"))
        self.url = f"http://127.0.0.1:{self.port}"
        for _ in range(600):
            try:
                urllib.request.urlopen(self.url + "/healthz", timeout=1); return
            except Exception:
                time.sleep(0.05)
        raise SystemExit("sluice did not start")

    def get(self, path):
        return json.load(urllib.request.urlopen(self.url + path, timeout=30))

    def query(self, sql):
        req = urllib.request.Request(self.url + "/v1/query", data=sql.encode(), method="POST")
        return json.load(urllib.request.urlopen(req, timeout=60))

    def stream(self, name):
        for s in self.get("/v1/streams")["streams"]:
            if s["name"] == name:
                return s
        return None

    def memory_mib(self, field):
        """A memory figure of the server from /proc (VmHWM: peak resident, VmRSS: now)."""
        with open(f"/proc/{self.proc.pid}/status") as f:
            for line in f:
                if line.startswith(field + ":"):
                    return int(line.split()[1]) / 1024
        return float("nan")

    def peak_rss_mib(self):
        return self.memory_mib("VmHWM")

    def stop(self):
        self.proc.send_signal(signal.SIGTERM)
        try:
            self.proc.wait(timeout=120)
        except subprocess.TimeoutExpired:
            self.proc.kill()


def du(path):
    total = 0
    for root, _, files in os.walk(path):
        for f in files:
            total += os.path.getsize(os.path.join(root, f))
    return total


def wait_landed(s, stream, expected):
    while True:
        info = s.stream(stream)
        if info and info["landed_offset"] >= expected:
            return
        time.sleep(0.02)


def send(binary, url, stream, path, concurrency=8, batch=10000):
    subprocess.run([binary, "send", stream, path, "--url", url, "--batch", str(batch),
                    "--batch-bytes", str(8 << 20), "--concurrency", str(concurrency), "--quiet"], check=True)


def freshness(s, lines, rate=50000, seconds=20):
    """Sends `rate` events/s for `seconds`; every 100 ms one probe event. Returns latencies
    (s) from the probe's HTTP 200 to its row being visible to a query."""
    per_req = 1000
    interval = per_req / rate
    acked, seen = {}, {}
    stop = threading.Event()
    body_cache = []
    for i in range(0, min(len(lines), 200 * per_req), per_req):
        body_cache.append("".join(lines[i:i + per_req]).encode())

    def load(worker, workers):
        k = worker
        t0 = time.monotonic()
        n = 0
        while not stop.is_set():
            target = t0 + n * interval * workers
            d = target - time.monotonic()
            if d > 0:
                time.sleep(d)
            req = urllib.request.Request(s.url + "/v1/streams/fresh/events", data=body_cache[k % len(body_cache)], method="POST")
            urllib.request.urlopen(req, timeout=30).read()
            k += workers; n += 1

    def probes():
        i = 0
        while not stop.is_set():
            body = json.dumps({"probe": i, "ts": "2026-01-01T00:00:00Z"}).encode()
            req = urllib.request.Request(s.url + "/v1/streams/fresh/events", data=body, method="POST")
            urllib.request.urlopen(req, timeout=30).read()
            acked[i] = time.monotonic()
            i += 1
            time.sleep(0.1)

    def watch():
        low = 0
        while not stop.is_set() or low < len(acked):
            try:
                rows = s.query(f"SELECT probe FROM fresh WHERE probe >= {low}")
            except Exception:
                time.sleep(0.02); continue
            now = time.monotonic()
            for r in rows:
                p = r.get("probe")
                if p is not None and p not in seen:
                    seen[p] = now
            while low in seen:
                low += 1
            if stop.is_set() and time.monotonic() > stop_at + 30:
                break
            time.sleep(0.02)

    workers = 4
    threads = [threading.Thread(target=load, args=(w, workers), daemon=True) for w in range(workers)]
    threads += [threading.Thread(target=probes, daemon=True)]
    w = threading.Thread(target=watch, daemon=True)
    for t in threads:
        t.start()
    w.start()
    time.sleep(seconds)
    stop_at = time.monotonic()
    stop.set()
    for t in threads:
        t.join()
    w.join()
    lat = sorted(seen[p] - acked[p] for p in acked if p in seen)
    return lat


def pct(xs, q):
    if not xs:
        return float("nan")
    return xs[min(len(xs) - 1, int(q * len(xs)))]


def duckdb_round(data, out, events):
    """DuckDB converting the NDJSON into date-partitioned zstd Parquet: (events/s, bytes, version)."""
    import duckdb
    con = duckdb.connect()
    t = time.monotonic()
    con.execute(f"""COPY (SELECT *, strftime(CAST(ts AS TIMESTAMP), '%Y-%m-%d') AS event_date
                   FROM read_json_auto('{data}', format='newline_delimited'))
                   TO '{out}' (FORMAT PARQUET, PARTITION_BY (event_date), COMPRESSION ZSTD)""")
    el = time.monotonic() - t
    size = du(out)
    shutil.rmtree(out, ignore_errors=True)
    return events / el, size, duckdb.__version__


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--bin", required=True)
    ap.add_argument("--events", type=int, default=1_000_000)
    ap.add_argument("--out", default=os.path.join(HERE, "RESULTS.md"))
    ap.add_argument("--rounds", type=int, default=3)
    a = ap.parse_args()

    work = tempfile.mkdtemp(prefix="sluice-bench-")
    data = os.path.join(work, "events.ndjson")
    with open(data, "w") as f:
        subprocess.run([sys.executable, GEN, "--count", str(a.events)], stdout=f, check=True)
    size = os.path.getsize(data)
    with open(data) as f:
        lines = f.readlines()
    rows = []

    # 1. Ingest into the durable log only (lake off).
    d = os.path.join(work, "log-only"); os.makedirs(d)
    s = Sluice(a.bin, d, "lake:\n  enabled: false\nstream_defaults:\n  partitions: 4\n")
    t = time.monotonic(); send(a.bin, s.url, "events", data); el = time.monotonic() - t
    assert s.stream("events")["log_end_offset"] == a.events
    rows.append(("HTTP ingest into the durable log (fsync'd)", a.events / el, size / el / 1e6, s.peak_rss_mib()))
    s.stop()

    # 2. End to end: HTTP -> log -> lake, until every event is queryable, against DuckDB
    # converting the same NDJSON (4, below), in alternating rounds: single runs of either moved
    # by up to a quarter on these machines. The median round's ratio is reported.
    rounds = []
    # DuckDB's first conversion in a process ran ~30% slower than the next ones (both runs of
    # session 28): one conversion first, not counted, so no round compares against a cold one.
    duckdb_round(data, os.path.join(work, "duck-warmup"), a.events)
    for r in range(a.rounds):
        duck_rate, duck_bytes, duck_version = duckdb_round(data, os.path.join(work, f"duck{r}"), a.events)
        d = os.path.join(work, f"e2e{r}"); os.makedirs(d)
        s = Sluice(a.bin, d, "stream_defaults:\n  partitions: 4\n")
        t = time.monotonic(); send(a.bin, s.url, "events", data); wait_landed(s, "events", a.events); el = time.monotonic() - t
        n = s.query("SELECT count(*) AS n FROM events")[0]["n"]
        assert n == a.events, n
        lake_bytes = du(os.path.join(d, "data", "lake", "events"))
        rss = s.peak_rss_mib()
        s.stop()
        shutil.rmtree(d, ignore_errors=True)
        rounds.append((a.events / el / duck_rate, a.events / el, el, duck_rate, duck_bytes, lake_bytes, rss))
        print(f"round {r + 1}: end to end {a.events / el:,.0f} events/s, DuckDB {duck_rate:,.0f}: {a.events / el / duck_rate:.2f}x", flush=True)
    ratios = [x[0] for x in rounds]
    rounds.sort()
    ratio, e2e_rate, el, duck_rate, duck_bytes, lake_bytes, rss = rounds[len(rounds) // 2]
    # Peak RSS: the highest of the rounds.
    rows.append(("HTTP -> log -> Delta lake, all rows queryable (median round)", e2e_rate, size / el / 1e6, max(x[6] for x in rounds)))

    # 2b. The same with a 250 ms flush interval: the last partial flush of a bulk load waits
    # for the interval (1 s by default), which is a large part of a few-second run.
    d = os.path.join(work, "e2e-250ms"); os.makedirs(d)
    s = Sluice(a.bin, d, "stream_defaults:\n  partitions: 4\nlake:\n  flush_interval: 250ms\n")
    t = time.monotonic(); send(a.bin, s.url, "events", data); wait_landed(s, "events", a.events); el = time.monotonic() - t
    assert s.query("SELECT count(*) AS n FROM events")[0]["n"] == a.events
    e2e_fast_rate = a.events / el
    rows.append(("HTTP -> log -> Delta lake, all rows queryable, flush_interval 250ms", e2e_fast_rate, size / el / 1e6, s.peak_rss_mib()))
    s.stop()

    # 3. Freshness at a steady 50k events/s.
    d = os.path.join(work, "fresh"); os.makedirs(d)
    s = Sluice(a.bin, d, "lake:\n  flush_interval: 250ms\n")
    lat = freshness(s, lines)
    fresh_rss = s.peak_rss_mib()
    s.stop()

    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next(l.split(":", 1)[1].strip() for l in f if l.startswith("model name"))
    except Exception:
        pass
    md = []
    md.append(f"# Benchmark results\n\nIssue 2 benchmark, `bash bench/ingest.sh` ({a.events:,} events from "
              f"`gen_events.py`, {size / a.events:.0f} bytes/event). Machine: {os.cpu_count()} cores, {cpu}. "
              f"Binary: `{a.bin}`. Date: {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}.\n")
    md.append("| measurement | events/s | MB/s | peak RSS MiB |\n|---|---:|---:|---:|")
    for name, r, mbs, rss in rows:
        md.append(f"| {name} | {r:,.0f} | {mbs:,.1f} | {rss:,.0f} |")
    md.append(f"| DuckDB {duck_version}: NDJSON -> date-partitioned zstd Parquet (offline, not durable; the median round's) | {duck_rate:,.0f} | {size * duck_rate / a.events / 1e6:,.1f} | |")
    md.append("")
    md.append(f"- **End-to-end vs DuckDB: {ratio:.2f}x** (target >= 1.0), the median of {len(ratios)} alternating rounds "
              f"({', '.join(f'{x:.2f}x' for x in ratios)}); with flush_interval 250ms: {e2e_fast_rate / duck_rate:.2f}x (one run, against the median round's DuckDB)")
    md.append(f"- Ingest into the log: {rows[0][1]:,.0f} events/s (target >= 1,000,000)")
    md.append(f"- Freshness at 50,000 events/s (HTTP 200 -> visible to SQL, flush_interval 250ms, {len(lat)} probes): "
              f"p50 {pct(lat, 0.5) * 1000:.0f} ms, p99 {pct(lat, 0.99) * 1000:.0f} ms (target p99 <= 1 s); peak RSS {fresh_rss:.0f} MiB")
    md.append(f"- Lake bytes/event: {lake_bytes / a.events:.1f} (DuckDB's Parquet: {duck_bytes / a.events:.1f})")
    md.append("")
    text = "\n".join(md)
    print(text)
    # Keep the hand-written analysis (everything from the marker on) across reruns.
    marker = "<!-- analysis: kept by bench/ingest_bench.py across runs -->"
    kept = ""
    if os.path.exists(a.out):
        old = open(a.out).read()
        if marker in old:
            kept = "\n" + old[old.index(marker):]
    with open(a.out, "w") as f:
        f.write(text + "\n" + kept)
    shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
