//! The lake: JSON → Arrow with schema evolution (`convert`), Delta tables (`delta`) and the
//! exactly-once landing of log streams into them (`sink`).

pub mod convert;
pub mod delta;
pub mod durable_store;
pub mod mirror;
pub mod sink;
