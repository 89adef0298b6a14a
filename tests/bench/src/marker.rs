//! Markers around the measured part of a stage, for profilers: with
//! `BENCH_MARKERS` set, `== measuring <what>` goes to stderr when the part
//! starts and `== measured <what>` when it ends (`tests/bench/profile`
//! samples between the two, past the stage's set-up).

/// Prints the end marker when dropped.
pub(crate) struct Measuring(Option<String>);

/// Marks the start of a measured part; the end is marked when the returned
/// guard is dropped.
pub(crate) fn measuring(what: &str) -> Measuring {
    if std::env::var_os("BENCH_MARKERS").is_none() {
        return Measuring(None);
    }
    eprintln!("== measuring {what}");
    Measuring(Some(what.to_owned()))
}

impl Drop for Measuring {
    fn drop(&mut self) {
        if let Some(what) = &self.0 {
            eprintln!("== measured {what}");
        }
    }
}
