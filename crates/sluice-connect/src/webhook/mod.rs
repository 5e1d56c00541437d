//! The webhook sink: a pipeline's records POSTed to an HTTP endpoint as JSON arrays of
//! `batch_records`, `concurrency` requests at a time, each retried on connection errors,
//! timeouts, 429 and 5xx with exponential backoff and jitter. Any other answer (a 4xx) fails
//! the flush, which the pipeline retries from its checkpoint: nothing is skipped.
//! At-least-once: a flush re-run after a crash is POSTed again.

use deltalake::arrow::array::RecordBatch;
use futures::future::BoxFuture;
use futures::StreamExt;
use sluice_core::pipeline::WebhookSinkConfig;
use sluice_pipeline::{rows_to_json, ExternalSink};
use std::time::Duration;

pub struct WebhookSink {
    cfg: WebhookSinkConfig,
    client: reqwest::Client,
    date_column: String,
}

impl WebhookSink {
    pub fn new(cfg: &WebhookSinkConfig, date_column: &str) -> anyhow::Result<WebhookSink> {
        let client = sluice_pipeline::http_client(cfg.timeout, cfg.concurrency, cfg.ca_file.as_deref()).map_err(|e| anyhow::anyhow!("webhook {}: {e}", cfg.url))?;
        Ok(WebhookSink { cfg: cfg.clone(), client, date_column: date_column.to_string() })
    }

    async fn post(&self, body: Vec<u8>) -> anyhow::Result<()> {
        let mut attempt = 0u32;
        loop {
            let mut req = self.client.post(&self.cfg.url).header("content-type", "application/json").body(body.clone());
            for (k, v) in &self.cfg.headers {
                req = req.header(k, v);
            }
            let error = match req.send().await {
                Ok(r) if r.status().is_success() => return Ok(()),
                Ok(r) => {
                    let status = r.status();
                    let text: String = r.text().await.unwrap_or_default().chars().take(200).collect();
                    if !(status.as_u16() == 429 || status.is_server_error()) {
                        anyhow::bail!("{} answered HTTP {status}: {text}", self.cfg.url);
                    }
                    format!("HTTP {status}: {text}")
                }
                Err(e) => e.to_string(),
            };
            attempt += 1;
            if attempt > self.cfg.retries {
                anyhow::bail!("{}: {error} (after {attempt} attempts)", self.cfg.url);
            }
            let delay = Duration::from_millis(200).saturating_mul(1 << (attempt - 1).min(6)).min(Duration::from_secs(10));
            tokio::time::sleep(delay.mul_f64(0.5 + fastrand::f64() / 2.0)).await;
        }
    }
}

impl ExternalSink for WebhookSink {
    fn write<'a>(&'a self, batches: &'a [RecordBatch]) -> BoxFuture<'a, anyhow::Result<usize>> {
        Box::pin(async move {
            let mut bodies = Vec::new();
            let mut current: Vec<u8> = Vec::new();
            let mut in_current = 0usize;
            let mut total = 0usize;
            for b in batches {
                for row in rows_to_json(b, &self.date_column)? {
                    current.push(if in_current == 0 { b'[' } else { b',' });
                    current.extend_from_slice(&row);
                    in_current += 1;
                    total += 1;
                    if in_current == self.cfg.batch_records {
                        current.push(b']');
                        bodies.push(std::mem::take(&mut current));
                        in_current = 0;
                    }
                }
            }
            if in_current > 0 {
                current.push(b']');
                bodies.push(current);
            }
            let results: Vec<anyhow::Result<()>> =
                futures::stream::iter(bodies.into_iter().map(|b| self.post(b))).buffer_unordered(self.cfg.concurrency).collect().await;
            results.into_iter().collect::<anyhow::Result<Vec<()>>>()?;
            Ok(total)
        })
    }
}
