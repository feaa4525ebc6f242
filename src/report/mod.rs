//! Results: the one CSV row struct, appending rows safely, and the terminal table.

pub mod csv_out;
pub mod plots;
pub mod row;
pub mod table;

pub use csv_out::append_row;
pub use row::{Row, RowContext, Status};
