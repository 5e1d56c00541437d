use deltalake::arrow::error::ArrowError;
use deltalake::datafusion::error::DataFusionError;
use sluice_lake::delta::LakeError;

/// Why a query failed. Messages are DataFusion's (they name the unknown table or column, the
/// syntax error's position, ...). [`QueryError::is_user_error`] tells a bad query (HTTP 400)
/// from a failure of the service (HTTP 500).
#[derive(thiserror::Error, Debug)]
pub enum QueryError {
    /// The statement would change something; only SELECT / WITH / EXPLAIN / SHOW / DESCRIBE run.
    #[error(
        "only read-only statements are allowed (SELECT, WITH, EXPLAIN, SHOW, DESCRIBE); got {0}"
    )]
    NotReadOnly(String),
    /// The query is wrong: SQL syntax, unknown table or column, type mismatch, invalid
    /// argument, division by zero, ...
    #[error("{0}")]
    User(String),
    /// A failure not caused by the query: storage, I/O, corrupt data, an internal bug.
    #[error("{0}")]
    Internal(String),
    /// Listing or loading lake tables failed.
    #[error(transparent)]
    Lake(#[from] LakeError),
    /// The result is larger than the engine's result limit.
    #[error("the query result is larger than {limit} bytes (limits.max_query_result_bytes): add a LIMIT, filter or aggregate")]
    ResultTooLarge { limit: usize },
    /// The result cannot be encoded in the requested format.
    #[error("cannot render the result as {format}: {message}")]
    Render {
        format: &'static str,
        message: String,
    },
}

impl QueryError {
    /// Whether the error is the query's fault (report as 400, not 500).
    pub fn is_user_error(&self) -> bool {
        matches!(
            self,
            QueryError::NotReadOnly(_) | QueryError::User(_) | QueryError::ResultTooLarge { .. }
        )
    }

    /// Classifies a DataFusion error, keeping its message.
    pub fn from_datafusion(err: DataFusionError) -> QueryError {
        let message = err.to_string();
        if is_user_error(&err) {
            QueryError::User(message)
        } else {
            QueryError::Internal(message)
        }
    }
}

impl From<DataFusionError> for QueryError {
    fn from(err: DataFusionError) -> Self {
        QueryError::from_datafusion(err)
    }
}

fn is_user_error(err: &DataFusionError) -> bool {
    match err {
        DataFusionError::SQL(..)
        | DataFusionError::NotImplemented(_)
        | DataFusionError::Plan(_)
        | DataFusionError::Configuration(_)
        | DataFusionError::SchemaError(..)
        // Runtime errors of functions on the query's values (invalid argument, unparsable
        // timestamp, ...). I/O and storage failures arrive as other variants.
        | DataFusionError::Execution(_)
        // The query needs more memory than limits.max_query_memory_bytes.
        | DataFusionError::ResourcesExhausted(_) => true,
        DataFusionError::ArrowError(e, _) => matches!(
            e.as_ref(),
            ArrowError::DivideByZero
                | ArrowError::CastError(_)
                | ArrowError::ArithmeticOverflow(_)
                | ArrowError::ParseError(_)
                | ArrowError::InvalidArgumentError(_)
                | ArrowError::ComputeError(_)
        ),
        DataFusionError::Context(_, inner) | DataFusionError::Diagnostic(_, inner) => {
            is_user_error(inner)
        }
        DataFusionError::Shared(inner) => is_user_error(inner),
        DataFusionError::Collection(errs) => errs.first().is_some_and(is_user_error),
        _ => false,
    }
}
