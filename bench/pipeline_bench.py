#!/usr/bin/env python3
"""Issue 3 benchmark (a) driver (stdlib only). See bench/pipeline.sh."""
import argparse, os, shutil, subprocess, sys, tempfile, time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from ingest_bench import GEN, Sluice, send  # noqa: E402

PIPELINE = """streams:
  events:
    partitions: 4
pipelines:
  split:
    from: events
    steps:
      - filter: "type IN ('scooter', 'app', 'decision')"
      - map:
          speed_ms: speed_kmh / 3.6
          amount_eur: coalesce(amount.value, amount_cents / 100.0)
          hour: substr(ts, 12, 2)
      - route:
          - to: scooters
            when: type = 'scooter'
          - to: app
            when: type = 'app'
          - to: decisions
            when: type = 'decision'
    to:
      scooters: { lake: {} }
      app: { lake: {} }
      decisions: { lake: {} }
"""

SECTION = "## Pipelines (issue 3, benchmark a)"


def run(binary, work, name, cfg, data, events, done):
    d = os.path.join(work, name); os.makedirs(d)
    s = Sluice(binary, d, cfg)
    t = time.monotonic()
    send(binary, s.url, "events", data)
    while not done(s):
        time.sleep(0.02)
    el = time.monotonic() - t
    rss = s.peak_rss_mib()
    return s, events / el, rss


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--bin", required=True)
    ap.add_argument("--events", type=int, default=1_000_000)
    ap.add_argument("--out", default="bench/RESULTS.md")
    a = ap.parse_args()
    work = tempfile.mkdtemp(prefix="sluice-pbench-")
    data = os.path.join(work, "events.ndjson")
    with open(data, "w") as f:
        subprocess.run([sys.executable, GEN, "--count", str(a.events)], stdout=f, check=True)

    def landed(s):
        st = s.stream("events")
        return st is not None and st["landed_offset"] >= a.events

    s, plain, plain_rss = run(a.bin, work, "plain", "stream_defaults:\n  partitions: 4\n", data, a.events, landed)
    assert s.query("SELECT count(*) AS n FROM events")[0]["n"] == a.events
    s.stop()

    def processed(s):
        p = s.get("/v1/pipelines")["pipelines"][0]
        return p["records_in"] >= a.events and p["lag"] == 0 and p["checkpoint_age_ms"] is not None

    s, piped, piped_rss = run(a.bin, work, "pipeline", PIPELINE, data, a.events, processed)
    n = sum(s.query(f"SELECT count(*) AS n FROM {t}")[0]["n"] for t in ("scooters", "app", "decisions"))
    assert n == a.events, n
    steps = s.get("/v1/pipelines")["pipelines"][0]["steps"]
    s.stop()
    shutil.rmtree(work, ignore_errors=True)

    lines = [SECTION, "",
             f"`bash bench/pipeline.sh` ({a.events:,} events of `gen_events.py`; binary `{a.bin}`; "
             f"{time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}). Both runs: HTTP -> log -> lake until every row is "
             "queryable. The pipeline filters (passing every record), maps three computed fields and routes by "
             "`type` into three tables.", "",
             "| run | events/s | peak RSS MiB |", "|---|---:|---:|",
             f"| plain landing (one table) | {plain:,.0f} | {plain_rss:,.0f} |",
             f"| filter + map + route into three tables | {piped:,.0f} | {piped_rss:,.0f} |", "",
             f"- **Pipeline vs plain landing: {piped / plain:.2f}x** (target >= 0.90)",
             "- Time in steps (CPU, summed over batches): "
             + ", ".join(f"{st['step']} {st['time_ms']} ms" for st in steps), ""]
    text = "\n".join(lines)
    print(text)
    # Replace this section where it is (after the analysis marker, so that bench/ingest.sh,
    # which rewrites everything above the marker, keeps it), else append it.
    old = open(a.out).read() if os.path.exists(a.out) else ""
    if SECTION in old:
        start = old.index(SECTION)
        end = old.find("\n## ", start + len(SECTION))
        old = old[:start] + (old[end + 1:] if end >= 0 else "")
    new = old.rstrip("\n") + "\n\n" + text
    with open(a.out, "w") as f:
        f.write(new)


if __name__ == "__main__":
    main()
