//! `sluice send STREAM [FILE|-]`: posts NDJSON in batches, with a progress bar, retrying
//! 429/503 (honouring Retry-After) and connection errors with exponential backoff.

use anyhow::Context;
use indicatif::{ProgressBar, ProgressStyle};
use std::io::{BufRead, BufReader, Read};
use std::path::PathBuf;
use std::time::Duration;

#[derive(clap::Args)]
pub struct SendArgs {
    /// Stream to write to.
    stream: String,
    /// NDJSON file; `-` or nothing reads standard input.
    file: Option<PathBuf>,
    /// Server address.
    #[arg(long, env = "SLUICE_URL", default_value = "http://127.0.0.1:7878")]
    url: String,
    /// Bearer token.
    #[arg(long, env = "SLUICE_TOKEN")]
    token: Option<String>,
    /// Records per request.
    #[arg(long, default_value_t = 5000)]
    batch: usize,
    /// Maximum bytes per request.
    #[arg(long, default_value_t = 4 << 20)]
    batch_bytes: usize,
    /// Requests in flight at once.
    #[arg(long, default_value_t = 4)]
    concurrency: usize,
    /// Compress requests with zstd.
    #[arg(long)]
    zstd: bool,
    /// No progress bar.
    #[arg(short, long)]
    quiet: bool,
}

pub async fn run(args: SendArgs) -> anyhow::Result<()> {
    let (input, total): (Box<dyn Read + Send>, Option<u64>) = match &args.file {
        None => (Box::new(std::io::stdin()), None),
        Some(p) if p.as_os_str() == "-" => (Box::new(std::io::stdin()), None),
        Some(p) => {
            let f = std::fs::File::open(p).with_context(|| format!("cannot open {}", p.display()))?;
            let len = f.metadata().ok().map(|m| m.len());
            (Box::new(f), len)
        }
    };
    let bar = if args.quiet {
        ProgressBar::hidden()
    } else {
        let b = match total {
            Some(t) => ProgressBar::new(t),
            None => ProgressBar::new_spinner(),
        };
        b.set_style(
            ProgressStyle::with_template("{spinner} [{elapsed_precise}] {wide_bar} {bytes}/{total_bytes} {bytes_per_sec} {msg}")
                .unwrap_or_else(|_| ProgressStyle::default_bar()),
        );
        b
    };
    let url = format!("{}/v1/streams/{}/events", args.url.trim_end_matches('/'), args.stream);
    let client = reqwest::Client::builder().timeout(Duration::from_secs(120)).build()?;

    // A reader thread cuts the input into batches; a bounded channel keeps memory bounded.
    let (tx, mut rx) = tokio::sync::mpsc::channel::<(Vec<u8>, usize, u64)>(args.concurrency * 2);
    let (batch_recs, batch_bytes) = (args.batch.max(1), args.batch_bytes.max(1024));
    let reader = std::thread::spawn(move || -> anyhow::Result<()> {
        let mut r = BufReader::with_capacity(1 << 20, input);
        let mut buf = Vec::with_capacity(batch_bytes + 4096);
        let (mut n, mut consumed) = (0usize, 0u64);
        let mut line = Vec::new();
        loop {
            line.clear();
            let read = r.read_until(b'\n', &mut line).context("reading input")?;
            if read == 0 {
                break;
            }
            consumed += read as u64;
            if line.iter().all(|b| b.is_ascii_whitespace()) {
                continue;
            }
            buf.extend_from_slice(&line);
            if !buf.ends_with(b"\n") {
                buf.push(b'\n');
            }
            n += 1;
            if n >= batch_recs || buf.len() >= batch_bytes {
                if tx.blocking_send((std::mem::take(&mut buf), n, consumed)).is_err() {
                    return Ok(());
                }
                (n, consumed) = (0, 0);
            }
        }
        if n > 0 {
            let _ = tx.blocking_send((buf, n, consumed));
        }
        Ok(())
    });

    let mut inflight = futures::stream::FuturesUnordered::new();
    let mut sent = 0usize;
    use futures::StreamExt;
    loop {
        while inflight.len() < args.concurrency.max(1) {
            match rx.recv().await {
                Some((body, n, consumed)) => {
                    let (client, url, token, zstd) = (client.clone(), url.clone(), args.token.clone(), args.zstd);
                    inflight.push(async move { post_with_retry(&client, &url, token.as_deref(), body, zstd).await.map(|_| (n, consumed)) });
                }
                None => break,
            }
        }
        match inflight.next().await {
            Some(res) => {
                let (n, consumed) = res?;
                sent += n;
                bar.inc(consumed);
                bar.set_message(format!("{sent} records"));
            }
            None => break,
        }
    }
    reader.join().map_err(|_| anyhow::anyhow!("input reader panicked"))??;
    bar.finish_and_clear();
    if !args.quiet {
        eprintln!("sent {sent} records to {}", args.stream);
    }
    Ok(())
}

async fn post_with_retry(client: &reqwest::Client, url: &str, token: Option<&str>, body: Vec<u8>, zstd: bool) -> anyhow::Result<()> {
    let (payload, encoding) = if zstd { (zstd::encode_all(&body[..], 3)?, Some("zstd")) } else { (body, None) };
    // Shared, not copied, by every attempt.
    let payload = bytes::Bytes::from(payload);
    let mut delay = Duration::from_millis(100);
    for attempt in 0.. {
        let mut req = client.post(url).header("content-type", "application/x-ndjson").body(payload.clone());
        if let Some(e) = encoding {
            req = req.header("content-encoding", e);
        }
        if let Some(t) = token {
            req = req.bearer_auth(t);
        }
        let wait = match req.send().await {
            Ok(resp) if resp.status().is_success() => return Ok(()),
            Ok(resp) if matches!(resp.status().as_u16(), 429 | 503) => {
                let retry_after = resp.headers().get("retry-after").and_then(|v| v.to_str().ok()).and_then(|v| v.parse::<u64>().ok());
                retry_after.map(Duration::from_secs).unwrap_or(delay)
            }
            Ok(resp) => {
                let status = resp.status();
                let text = resp.text().await.unwrap_or_default();
                anyhow::bail!("{url}: HTTP {status}: {}", text.trim());
            }
            Err(e) if attempt < 20 => {
                tracing::debug!("retrying after {e}");
                delay
            }
            Err(e) => return Err(e).context(format!("POST {url}")),
        };
        let jitter = Duration::from_millis(fastrand::u64(0..=delay.as_millis() as u64 / 2 + 1));
        tokio::time::sleep(wait + jitter).await;
        delay = (delay * 2).min(Duration::from_secs(10));
    }
    unreachable!("the retry loop returns")
}
