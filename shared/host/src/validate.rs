//! Request validation shared by every service: [`FieldViolations`] collects
//! what is wrong with a request, field by field, and becomes one
//! `INVALID_ARGUMENT` status with a `google.rpc.BadRequest`; the checks below
//! record into it.
//!
//! Each check records a field violation in a [`FieldViolations`] instead of
//! stopping at the first problem, so a caller learns everything wrong with a
//! request at once, and returns the value it read; a value is only used once
//! [`FieldViolations::check`] passed.

use base64::Engine as _;
use uuid::Uuid;

use tonic::{Code, Status};
use tonic_types::{ErrorDetails, FieldViolation, StatusExt as _};

/// Most field violations one status reports.
pub const MAX_REPORTED_VIOLATIONS: usize = 20;

/// `text` cut to at most `max` characters.
fn truncate(text: &str, max: usize) -> String {
    match text.char_indices().nth(max) {
        Some((at, _)) => format!("{}…", &text[..at]),
        None => text.to_owned(),
    }
}

/// Collects what is wrong with a request, field by field, and turns it into
/// one `INVALID_ARGUMENT` status carrying a `google.rpc.BadRequest`.
#[derive(Debug, Default)]
pub struct FieldViolations {
    violations: Vec<FieldViolation>,
}

impl std::fmt::Display for FieldViolations {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "invalid request: ")?;
        let fields: Vec<&str> = self.fields().collect();
        write!(f, "{}", fields.join(", "))
    }
}

impl std::error::Error for FieldViolations {}

impl FieldViolations {
    /// No violations yet.
    pub fn new() -> Self {
        Self::default()
    }

    /// Records that `field` (a path such as `items[2].quantity`) is invalid.
    pub fn add(&mut self, field: impl Into<String>, description: impl Into<String>) {
        self.violations.push(FieldViolation::new(field, description));
    }

    /// Whether nothing was recorded.
    pub fn is_empty(&self) -> bool {
        self.violations.is_empty()
    }

    /// `Ok` when nothing was recorded, otherwise these violations as the
    /// error.
    pub fn check(self) -> Result<(), Self> {
        if self.violations.is_empty() {
            Ok(())
        } else {
            Err(self)
        }
    }

    /// The field paths recorded, in order.
    pub fn fields(&self) -> impl Iterator<Item = &str> {
        self.violations.iter().map(|v| v.field.as_str())
    }

    /// The `INVALID_ARGUMENT` status whose details carry the violations as a
    /// `google.rpc.BadRequest` and whose message lists the first ones.
    ///
    /// Status details travel in a header, which HTTP/2 peers cap (16 KiB by
    /// default): a request with hundreds of bad fields would otherwise turn
    /// into a protocol error. At most [`MAX_REPORTED_VIOLATIONS`] are
    /// reported, the last one saying how many more there were.
    pub fn into_status(mut self) -> Status {
        if self.violations.len() > MAX_REPORTED_VIOLATIONS {
            let more = self.violations.len() - (MAX_REPORTED_VIOLATIONS - 1);
            self.violations.truncate(MAX_REPORTED_VIOLATIONS - 1);
            self.violations
                .push(FieldViolation::new("…", format!("and {more} more violations")));
        }
        let shown = self.violations.len().min(5);
        let mut summary = self.violations[..shown]
            .iter()
            .map(|v| format!("{}: {}", v.field, truncate(&v.description, 200)))
            .collect::<Vec<_>>()
            .join("; ");
        if self.violations.len() > shown {
            summary.push_str(&format!("; … ({} in all)", self.violations.len()));
        }
        for violation in &mut self.violations {
            violation.description = truncate(&violation.description, 200);
            violation.field = truncate(&violation.field, 100);
        }
        Status::with_error_details(
            Code::InvalidArgument,
            format!("invalid request: {summary}"),
            ErrorDetails::with_bad_request(self.violations),
        )
    }
}

/// Page size when the request sets none.
pub const DEFAULT_PAGE_SIZE: i64 = 50;
/// Largest page a caller may ask for.
pub const MAX_PAGE_SIZE: i32 = 1000;

/// Checks a required UUID.
pub fn uuid(field: &str, value: &str, violations: &mut FieldViolations) -> Uuid {
    if value.is_empty() {
        violations.add(field, "is required");
        return Uuid::nil();
    }
    Uuid::try_parse(value).unwrap_or_else(|_| {
        violations.add(field, "must be a UUID");
        Uuid::nil()
    })
}

/// Checks an optional UUID: empty means absent.
pub fn optional_uuid(field: &str, value: &str, violations: &mut FieldViolations) -> Option<Uuid> {
    (!value.is_empty()).then(|| uuid(field, value, violations))
}

/// Checks an expected version: a version the caller has seen, so at least 1.
pub fn expected_version(field: &str, value: i64, violations: &mut FieldViolations) -> i64 {
    if value < 1 {
        violations.add(field, "must be the version last read (1 or more)");
    }
    value
}

/// Checks a page size: 1 to 1000 when set, the default when unset.
pub fn page_size(field: &str, value: Option<i32>, violations: &mut FieldViolations) -> i64 {
    match value {
        None => DEFAULT_PAGE_SIZE,
        Some(size) if (1..=MAX_PAGE_SIZE).contains(&size) => i64::from(size),
        Some(_) => {
            violations.add(field, format!("must be between 1 and {MAX_PAGE_SIZE}"));
            DEFAULT_PAGE_SIZE
        }
    }
}

/// The opaque token of the page after `last_id`.
pub fn page_token(last_id: Uuid) -> String {
    base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(last_id.as_bytes())
}

/// Checks a page token from [`page_token`]; empty means the first page.
pub fn page_after(field: &str, token: &str, violations: &mut FieldViolations) -> Option<Uuid> {
    if token.is_empty() {
        return None;
    }
    let decoded = base64::engine::general_purpose::URL_SAFE_NO_PAD
        .decode(token)
        .ok()
        .and_then(|bytes| Uuid::from_slice(&bytes).ok());
    if decoded.is_none() {
        violations.add(field, "is not a token from a previous response");
    }
    decoded
}

#[cfg(test)]
mod tests {
    use tonic_types::StatusExt as _;

    use super::*;

    #[test]
    fn page_tokens_round_trip_and_garbage_is_refused() {
        let id = Uuid::now_v7();
        let mut v = FieldViolations::new();
        assert_eq!(page_after("page_token", &page_token(id), &mut v), Some(id));
        assert!(v.is_empty());
        assert_eq!(page_after("page_token", "not-a-token!", &mut v), None);
        assert_eq!(v.fields().collect::<Vec<_>>(), ["page_token"]);
    }

    #[test]
    fn page_size_defaults_when_unset_and_is_bounded_when_set() {
        let mut v = FieldViolations::new();
        assert_eq!(page_size("page_size", None, &mut v), DEFAULT_PAGE_SIZE);
        assert_eq!(page_size("page_size", Some(1000), &mut v), 1000);
        assert!(v.is_empty());
        page_size("page_size", Some(0), &mut v);
        page_size("page_size", Some(1001), &mut v);
        page_size("page_size", Some(-5), &mut v);
        assert_eq!(v.fields().count(), 3);
    }

    #[test]
    fn hundreds_of_violations_are_reported_as_twenty_with_a_count_of_the_rest() {
        let mut violations = FieldViolations::new();
        for i in 0..250 {
            violations.add(format!("items[{i}].product_id"), "is required");
        }

        let status = violations.into_status();

        let reported = status.get_details_bad_request().unwrap().field_violations;
        assert_eq!(reported.len(), MAX_REPORTED_VIOLATIONS);
        assert_eq!(reported.last().unwrap().description, "and 231 more violations");
        assert!(status.message().contains("(20 in all)"), "{}", status.message());
        assert!(status.message().len() < 1000);
    }
}
