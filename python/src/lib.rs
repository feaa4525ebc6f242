//! `vramcal._vramcal`: the native half of the Python package (PyO3, stable ABI from Python 3.8).
//! It exposes one function, the estimator as `vramcal estimate --json` runs it
//! ([`vramcal::commands::estimate::json_from_args`]), so that Python and the command line give
//! the same numbers; `vramcal/__init__.py` turns keyword arguments into that command line and
//! the JSON into a dict.

use pyo3::exceptions::PyValueError;
use pyo3::prelude::*;

/// `vramcal estimate <args> --json`: the JSON text, or `ValueError` with the line the command
/// would print after `error: `. The GIL is released meanwhile (a model id may mean fetching its
/// config.json from the Hub).
#[pyfunction]
fn estimate_json(py: Python<'_>, args: Vec<String>) -> PyResult<String> {
    py.detach(|| vramcal::commands::estimate::json_from_args(&args))
        .map_err(PyValueError::new_err)
}

/// The module.
#[pymodule]
fn _vramcal(m: &Bound<'_, PyModule>) -> PyResult<()> {
    m.add_function(wrap_pyfunction!(estimate_json, m)?)?;
    m.add("__version__", env!("CARGO_PKG_VERSION"))?;
    Ok(())
}
