//! Prometheus metrics: one recorder for the process, rendered at `GET /metrics`.

use metrics_exporter_prometheus::{PrometheusBuilder, PrometheusHandle};

pub fn install() -> anyhow::Result<PrometheusHandle> {
    let handle = PrometheusBuilder::new()
        .set_buckets(&[0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0])?
        .install_recorder()?;
    describe();
    Ok(handle)
}

fn describe() {
    use metrics::{describe_counter, describe_gauge, describe_histogram, Unit};
    describe_counter!("sluice_ingest_records_total", "Records accepted over HTTP (durable in the log)");
    describe_counter!("sluice_ingest_bytes_total", Unit::Bytes, "Request bytes accepted (after decompression)");
    describe_counter!("sluice_ingest_requests_total", "Ingest requests by stream and HTTP status");
    describe_histogram!("sluice_log_sync_seconds", Unit::Seconds, "Time from append to durable (group commit fsync) per request");
    describe_histogram!("sluice_lake_commit_seconds", Unit::Seconds, "Time to convert and commit one lake flush");
    describe_counter!("sluice_lake_rows_total", "Rows committed to lake tables");
    describe_counter!("sluice_lake_commits_total", "Delta commits made by the lake sink");
    describe_counter!("sluice_lake_errors_total", "Lake sink errors (retried)");
    describe_counter!("sluice_dlq_records_total", "Records sent to the dead-letter table");
    describe_gauge!("sluice_lake_lag_records", "Durable log records not yet landed in the lake");
    describe_gauge!("sluice_log_end_offset", "Log end offset (sum over partitions)");
    describe_gauge!("sluice_log_bytes", Unit::Bytes, "Log bytes on disk");
    describe_gauge!("sluice_pipeline_lag_records", "Source records a pipeline has not processed yet");
    describe_gauge!("sluice_pipeline_step_records", "Records through a pipeline step, by outcome");
    describe_histogram!("sluice_pipeline_step_seconds", Unit::Seconds, "Time a pipeline step takes per batch (up to 8192 records)");
    describe_counter!("sluice_pipeline_sink_records_total", "Records a pipeline wrote to a sink");
    describe_counter!("sluice_pipeline_dlq_records_total", "Records a pipeline sent to its dead-letter table");
    describe_counter!("sluice_pipeline_errors_total", "Pipeline errors (the flush is retried from the checkpoint)");
}
