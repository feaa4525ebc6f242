//! Results: the one CSV row struct, appending rows safely, and plots.

pub mod csv_out;
pub mod plots;
pub mod row;

pub use csv_out::append_row;
pub use row::{Row, RowContext, Status};
