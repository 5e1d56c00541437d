//! Record batches as the pipeline hands them to sinks, built from JSON lines.

use deltalake::arrow::array::RecordBatch;
use deltalake::arrow::compute::concat_batches;
use sluice_lake::convert::{convert, ConvertOptions, InputRecord};

/// `lines` converted as records of partition 0 from `first_offset` on, in one batch.
pub fn batch(lines: &[&str], first_offset: u64) -> RecordBatch {
    let inputs: Vec<InputRecord> = lines
        .iter()
        .enumerate()
        .map(|(i, l)| InputRecord { partition: 0, offset: first_offset + i as u64, timestamp_ms: 0, value: l.as_bytes() })
        .collect();
    let c = convert(None, &inputs, &ConvertOptions::default());
    concat_batches(&c.schema, &c.batches).unwrap()
}
