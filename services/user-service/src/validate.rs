//! The rules a request must meet, checked before any database work.
//!
//! Each check records a field violation instead of stopping at the first
//! problem, so a caller learns everything wrong with a request at once, and
//! returns the value it read; a value is only used once
//! [`FieldViolations::check`] passed. The `TryFrom` impls at the end turn
//! each request into the validated command the store takes.

use shop_contracts::user as pb;
pub use shop_host::validate::{
    FieldViolations, expected_version, optional_uuid, page_after, page_size, page_token, uuid,
};
use uuid::Uuid;

use crate::resync::Resync;
use crate::store::{NewUser, Selection, UserChange};

/// Longest email address (RFC 5321 path limit).
pub const EMAIL_MAX: usize = 254;
/// Longest local part of an email address.
const EMAIL_LOCAL_MAX: usize = 64;
/// Longest name, in characters, after trimming.
pub const NAME_MAX: usize = 200;
/// Checks an email address: at most 254 characters, one `@`, a dot-atom
/// local part of at most 64 characters (letters, digits and
/// ``!#$%&'*+/=?^_`{|}~-``, dots between), and a domain of at least two
/// dot-separated labels of letters, digits and inner hyphens, each at most 63
/// characters. ASCII only; quoted local parts and address literals are
/// refused. Returns the address unchanged: case is kept, uniqueness ignores
/// it.
pub fn email(field: &str, value: &str, violations: &mut FieldViolations) -> String {
    if let Err(problem) = check_email(value) {
        violations.add(field, problem);
    }
    value.to_owned()
}

fn check_email(value: &str) -> Result<(), String> {
    if value.is_empty() {
        return Err("must not be empty".to_owned());
    }
    if value.len() > EMAIL_MAX {
        return Err(format!("must be at most {EMAIL_MAX} characters"));
    }
    let Some((local, domain)) = value.rsplit_once('@') else {
        return Err("must be an email address like name@example.com".to_owned());
    };
    let atext = |c: char| c.is_ascii_alphanumeric() || "!#$%&'*+/=?^_`{|}~-".contains(c);
    let local_ok = !local.is_empty()
        && local.len() <= EMAIL_LOCAL_MAX
        && local
            .split('.')
            .all(|atom| !atom.is_empty() && atom.chars().all(atext));
    if !local_ok {
        return Err("has an invalid part before the @".to_owned());
    }
    let labels: Vec<&str> = domain.split('.').collect();
    let label_ok = |label: &&str| {
        !label.is_empty()
            && label.len() <= 63
            && label.chars().all(|c| c.is_ascii_alphanumeric() || c == '-')
            && !label.starts_with('-')
            && !label.ends_with('-')
    };
    if labels.len() < 2 || !labels.iter().all(label_ok) {
        return Err("has an invalid domain after the @".to_owned());
    }
    Ok(())
}

/// Checks a display name: trimmed, 1 to 200 characters, no control
/// characters. Returns the trimmed name.
pub fn name(field: &str, value: &str, violations: &mut FieldViolations) -> String {
    let trimmed = value.trim();
    let length = trimmed.chars().count();
    if length == 0 {
        violations.add(field, "must not be empty");
    } else if length > NAME_MAX {
        violations.add(field, format!("must be at most {NAME_MAX} characters"));
    } else if trimmed.chars().any(char::is_control) {
        violations.add(field, "must not contain control characters");
    }
    trimmed.to_owned()
}

impl TryFrom<pb::CreateUserRequest> for NewUser {
    type Error = FieldViolations;

    fn try_from(request: pb::CreateUserRequest) -> Result<Self, FieldViolations> {
        let mut violations = FieldViolations::new();
        let new = NewUser {
            email: email("email", &request.email, &mut violations),
            name: name("name", &request.name, &mut violations),
            request_id: optional_uuid("request_id", &request.request_id, &mut violations),
        };
        violations.check().map(|()| new)
    }
}

impl TryFrom<pb::UpdateUserRequest> for UserChange {
    type Error = FieldViolations;

    fn try_from(request: pb::UpdateUserRequest) -> Result<Self, FieldViolations> {
        let mut violations = FieldViolations::new();
        if request.email.is_none() && request.name.is_none() {
            violations.add("email", "set email or name (or both) to change");
        }
        let change = UserChange {
            id: uuid("id", &request.id, &mut violations),
            expected_version: expected_version("expected_version", request.expected_version, &mut violations),
            email: request.email.map(|value| email("email", &value, &mut violations)),
            name: request.name.map(|value| name("name", &value, &mut violations)),
        };
        violations.check().map(|()| change)
    }
}

/// A validated `DeleteUser`.
#[derive(Debug, Clone, Copy)]
pub struct Deletion {
    /// The user.
    pub id: Uuid,
    /// The version the caller saw.
    pub expected_version: i64,
}

impl TryFrom<pb::DeleteUserRequest> for Deletion {
    type Error = FieldViolations;

    fn try_from(request: pb::DeleteUserRequest) -> Result<Self, FieldViolations> {
        let mut violations = FieldViolations::new();
        let deletion = Deletion {
            id: uuid("id", &request.id, &mut violations),
            expected_version: expected_version("expected_version", request.expected_version, &mut violations),
        };
        violations.check().map(|()| deletion)
    }
}

/// A validated `ListUsers`.
#[derive(Debug, Clone, Copy)]
pub struct Page {
    /// Rows per page.
    pub size: i64,
    /// Last id of the previous page.
    pub after: Option<Uuid>,
}

impl TryFrom<pb::ListUsersRequest> for Page {
    type Error = FieldViolations;

    fn try_from(request: pb::ListUsersRequest) -> Result<Self, FieldViolations> {
        let mut violations = FieldViolations::new();
        let page = Page {
            size: page_size("page_size", request.page_size, &mut violations),
            after: page_after("page_token", &request.page_token, &mut violations),
        };
        violations.check().map(|()| page)
    }
}

/// The id of a `GetUser`.
pub fn get_user(request: &pb::GetUserRequest) -> Result<Uuid, FieldViolations> {
    let mut violations = FieldViolations::new();
    let id = uuid("id", &request.id, &mut violations);
    violations.check().map(|()| id)
}

/// Most ids one `ResyncUsers` may name.
pub const RESYNC_MAX_IDS: usize = 1000;

/// Checks a `ResyncUsers`: exactly one selection; `users.ids` 1 to
/// [`RESYNC_MAX_IDS`] UUIDs, none twice; `changed_since` a valid
/// timestamp; `max_per_second`, when set, 1 to `server_max` (unset:
/// `server_max`).
pub fn resync(request: &pb::ResyncUsersRequest, server_max: u32) -> Result<Resync, FieldViolations> {
    use pb::resync_users_request::Selection as Requested;

    let mut violations = FieldViolations::new();
    let selection = match &request.selection {
        None => {
            violations.add("selection", "set exactly one of users, changed_since or all");
            Selection::All
        }
        Some(Requested::Users(users)) => Selection::Ids(resync_ids(&users.ids, &mut violations)),
        Some(Requested::ChangedSince(since)) => {
            let since = chrono::DateTime::from_timestamp(
                since.seconds,
                u32::try_from(since.nanos).unwrap_or(u32::MAX),
            );
            Selection::ChangedSince(since.unwrap_or_else(|| {
                violations.add("changed_since", "must be a valid timestamp");
                chrono::DateTime::UNIX_EPOCH
            }))
        }
        Some(Requested::All(true)) => Selection::All,
        Some(Requested::All(false)) => {
            violations.add(
                "all",
                "must be true when set (or set users or changed_since instead)",
            );
            Selection::All
        }
    };
    let max_per_second = match request.max_per_second {
        None => server_max,
        Some(asked) => match u32::try_from(asked) {
            Ok(asked) if (1..=server_max).contains(&asked) => asked,
            _ => {
                violations.add("max_per_second", format!("must be between 1 and {server_max}"));
                server_max
            }
        },
    };
    violations.check().map(|()| Resync {
        selection,
        max_per_second,
    })
}

/// The ids of a resync's `users`, sorted.
fn resync_ids(ids: &[String], violations: &mut FieldViolations) -> Vec<Uuid> {
    if ids.is_empty() {
        violations.add("users.ids", "must name at least one user");
    }
    if ids.len() > RESYNC_MAX_IDS {
        violations.add(
            "users.ids",
            format!("must name at most {RESYNC_MAX_IDS} users (use changed_since or all for more)"),
        );
        return Vec::new();
    }
    let mut seen = std::collections::HashMap::with_capacity(ids.len());
    let mut parsed = Vec::with_capacity(ids.len());
    for (at, value) in ids.iter().enumerate() {
        let field = format!("users.ids[{at}]");
        let mut wrong = FieldViolations::new();
        let id = uuid(&field, value, &mut wrong);
        if !wrong.is_empty() {
            violations.add(field, "must be a UUID");
            continue;
        }
        match seen.get(&id) {
            Some(first) => violations.add(field, format!("repeats users.ids[{first}]")),
            None => {
                seen.insert(id, at);
                parsed.push(id);
            }
        }
    }
    parsed.sort_unstable();
    parsed
}

#[cfg(test)]
mod tests {
    use super::*;

    fn email_ok(value: &str) -> bool {
        let mut v = FieldViolations::new();
        email("email", value, &mut v);
        v.is_empty()
    }

    #[test]
    fn accepts_ordinary_email_addresses() {
        for value in [
            "ada@example.com",
            "Ada.Lovelace+shop@mail.example.co.uk",
            "a_b-c@x-y.io",
            "o'brien@example.ie",
        ] {
            assert!(email_ok(value), "{value} should be accepted");
        }
    }

    #[test]
    fn refuses_malformed_email_addresses() {
        let too_long = format!("{}@example.com", "a".repeat(250));
        let long_local = format!("{}@example.com", "a".repeat(65));
        for value in [
            "",
            "plain",
            "@example.com",
            "ada@",
            "ada@localhost",
            "ada@@example.com",
            "ada@exa mple.com",
            "ada..l@example.com",
            ".ada@example.com",
            "ada@-example.com",
            "ada@example..com",
            "ädä@example.com",
            "\"quoted\"@example.com",
            " ada@example.com",
            too_long.as_str(),
            long_local.as_str(),
        ] {
            assert!(!email_ok(value), "{value:?} should be refused");
        }
    }

    #[test]
    fn names_are_trimmed_and_bounded_in_characters() {
        let mut v = FieldViolations::new();
        assert_eq!(name("name", "  Ada  ", &mut v), "Ada");
        assert_eq!(name("name", &"é".repeat(200), &mut v).chars().count(), 200);
        assert!(v.is_empty());
        name("name", "   ", &mut v);
        name("name", &"x".repeat(201), &mut v);
        name("name", "a\u{0}b", &mut v);
        assert_eq!(v.fields().count(), 3);
    }
}
