//! `sluice stream stats [STREAM]`: raw vs stored bytes per record of a running server's
//! streams, by codec and by dictionary version (`GET /v1/streams/{s}/stats`).

use serde_json::Value;

#[derive(clap::Args)]
pub struct StreamArgs {
    #[command(subcommand)]
    cmd: StreamCmd,
}

#[derive(clap::Subcommand)]
enum StreamCmd {
    /// Raw vs stored bytes per record, by codec and by dictionary version.
    Stats {
        /// One stream (default: all).
        stream: Option<String>,
        /// The server.
        #[arg(long, default_value = "http://127.0.0.1:7878", env = "SLUICE_URL")]
        url: String,
        /// Bearer token (read scope for the streams).
        #[arg(long, env = "SLUICE_TOKEN")]
        token: Option<String>,
        /// Print the API's JSON instead of tables.
        #[arg(long)]
        json: bool,
    },
}

pub async fn run_cli(args: StreamArgs) -> anyhow::Result<()> {
    let StreamCmd::Stats { stream, url, token, json } = args.cmd;
    let base = url.trim_end_matches('/').to_string();
    let client = reqwest::Client::new();
    let get = |path: String| {
        let mut req = client.get(format!("{base}{path}"));
        if let Some(t) = &token {
            req = req.bearer_auth(t);
        }
        let base = base.clone();
        async move {
            let resp = req.send().await.map_err(|e| anyhow::anyhow!("{base}: {e}"))?;
            let status = resp.status();
            let text = resp.text().await.map_err(|e| anyhow::anyhow!("{base}: {e}"))?;
            let body: Value = serde_json::from_str(&text).map_err(|e| anyhow::anyhow!("{base}: {e}: {text}"))?;
            if !status.is_success() {
                anyhow::bail!("{status}: {}", body.get("error").and_then(Value::as_str).unwrap_or("request failed"));
            }
            Ok(body)
        }
    };
    let names: Vec<String> = match stream {
        Some(s) => vec![s],
        None => get("/v1/streams".into())
            .await?
            .get("streams")
            .and_then(Value::as_array)
            .map(|a| a.iter().filter_map(|s| s.get("name").and_then(Value::as_str).map(str::to_string)).collect())
            .unwrap_or_default(),
    };
    let mut all = Vec::new();
    for n in &names {
        all.push(get(format!("/v1/streams/{n}/stats")).await?);
    }
    if json {
        println!("{}", serde_json::to_string_pretty(&Value::Array(all))?);
        return Ok(());
    }
    print!("{}", render(&all));
    Ok(())
}

fn f(v: &Value, k: &str) -> f64 {
    v.get(k).and_then(Value::as_f64).unwrap_or(0.0)
}

/// The tables `sluice stream stats` prints.
pub fn render(stats: &[Value]) -> String {
    use std::fmt::Write;
    let mut out = String::new();
    let _ = writeln!(out, "{:<24} {:>12} {:>10} {:>10} {:>12} {:>7}  codec", "stream", "records", "batches", "raw B/rec", "stored B/rec", "ratio");
    for s in stats {
        let (raw, stored) = (f(s, "raw_bytes"), f(s, "stored_bytes"));
        let _ = writeln!(
            out,
            "{:<24} {:>12} {:>10} {:>10.1} {:>12.1} {:>7.3}  {}",
            s.get("stream").and_then(Value::as_str).unwrap_or("?"),
            f(s, "records"),
            f(s, "batches"),
            f(s, "raw_bytes_per_record"),
            f(s, "stored_bytes_per_record"),
            if raw > 0.0 { stored / raw } else { 0.0 },
            s.get("codec").and_then(Value::as_str).unwrap_or("?"),
        );
    }
    for s in stats {
        let name = s.get("stream").and_then(Value::as_str).unwrap_or("?");
        if let Some(by) = s.get("by_codec").and_then(Value::as_object).filter(|m| !m.is_empty()) {
            let _ = writeln!(out, "\n{name}: by codec");
            let _ = writeln!(out, "  {:<10} {:>10} {:>12} {:>12} {:>7}", "codec", "batches", "records", "stored B/rec", "ratio");
            for (codec, c) in by {
                let (recs, raw, stored) = (f(c, "records"), f(c, "raw_bytes"), f(c, "stored_bytes"));
                let _ = writeln!(
                    out,
                    "  {:<10} {:>10} {:>12} {:>12.1} {:>7.3}",
                    codec,
                    f(c, "batches"),
                    recs,
                    if recs > 0.0 { stored / recs } else { 0.0 },
                    if raw > 0.0 { stored / raw } else { 0.0 },
                );
            }
        }
        if let Some(ds) = s.get("dictionaries").and_then(Value::as_array).filter(|d| !d.is_empty()) {
            let _ = writeln!(out, "\n{name}: dictionaries");
            let _ = writeln!(out, "  {:>4} {:<9} {:>9} {:>10} {:>8} {:>10} {:>12} {:>7}", "id", "state", "size", "trained on", "holdout", "batches", "records", "ratio");
            for d in ds {
                let state = if d.get("unusable").is_some_and(|u| !u.is_null()) {
                    "UNUSABLE"
                } else if d.get("current").and_then(Value::as_bool) == Some(true) {
                    "current"
                } else if d.get("retired").and_then(Value::as_bool) == Some(true) {
                    "retired"
                } else {
                    "old"
                };
                let opt = |k: &str| d.get(k).and_then(Value::as_f64);
                let _ = writeln!(
                    out,
                    "  {:>4} {:<9} {:>9} {:>10} {:>8} {:>10} {:>12} {:>7}",
                    f(d, "id"),
                    state,
                    opt("size_bytes").map_or("-".into(), |b| format!("{:.1}KiB", b / 1024.0)),
                    opt("sample_records").map_or("-".into(), |n| n.to_string()),
                    opt("holdout_ratio").map_or("-".into(), |r| format!("{r:.3}")),
                    f(d, "batches"),
                    f(d, "records"),
                    opt("ratio").map_or("-".into(), |r| format!("{r:.3}")),
                );
                if let Some(why) = d.get("unusable").and_then(Value::as_str) {
                    let _ = writeln!(out, "       {why}");
                }
            }
        }
    }
    out
}
