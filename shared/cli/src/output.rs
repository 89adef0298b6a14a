//! Printing results: tables for people, JSON for scripts.

use comfy_table::Table;
use serde_json::json;
use shop_client::{Error, Order, ResyncProgress, User};

use crate::Failure;
use crate::records::{ORDER_HEADER, USER_HEADER, order_json, order_row, user_json, user_row};

/// Where and how results are printed.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Output {
    pub(crate) json: bool,
}

fn table(header: &[&str], rows: impl IntoIterator<Item = Vec<String>>) -> Table {
    let mut table = Table::new();
    table.load_preset(comfy_table::presets::NOTHING);
    table.set_header(header.to_vec());
    for row in rows {
        table.add_row(row);
    }
    table
}

#[allow(clippy::print_stdout, clippy::print_stderr)] // printing is what this is for
impl Output {
    pub(crate) fn user(&self, user: &User) {
        if self.json {
            println!("{}", user_json(user));
        } else {
            println!("{}", table(&USER_HEADER, [user_row(user)]));
        }
    }

    pub(crate) fn users(&self, users: &[User], next_page_token: &str) {
        if self.json {
            let users: Vec<_> = users.iter().map(user_json).collect();
            println!("{}", json!({"users": users, "next_page_token": next_page_token}));
            return;
        }
        println!("{}", table(&USER_HEADER, users.iter().map(user_row)));
        if !next_page_token.is_empty() {
            println!("more: --page-token {next_page_token}");
        }
    }

    pub(crate) fn order(&self, order: &Order) {
        if self.json {
            println!("{}", order_json(order));
        } else {
            println!("{}", table(&ORDER_HEADER, [order_row(order)]));
        }
    }

    pub(crate) fn orders(&self, orders: &[Order], next_page_token: &str) {
        if self.json {
            let orders: Vec<_> = orders.iter().map(order_json).collect();
            println!(
                "{}",
                json!({"orders": orders, "next_page_token": next_page_token})
            );
            return;
        }
        println!("{}", table(&ORDER_HEADER, orders.iter().map(order_row)));
        if !next_page_token.is_empty() {
            println!("more: --page-token {next_page_token}");
        }
    }

    /// One progress message of a resync: a JSON line, or a line for
    /// people.
    pub(crate) fn resync_progress(&self, progress: &ResyncProgress) {
        if self.json {
            println!(
                "{}",
                json!({"written": progress.written, "total": progress.total, "unknown_ids": progress.unknown_ids})
            );
        } else {
            println!("written {} of {} snapshots", progress.written, progress.total);
        }
    }

    /// The end of a resync (in JSON, the last progress line said it all).
    pub(crate) fn resync_done(&self, last: &ResyncProgress) {
        if self.json {
            return;
        }
        println!("resync done: {} snapshots written", last.written);
        if !last.unknown_ids.is_empty() {
            println!(
                "unknown users (never known to the service): {}",
                last.unknown_ids.join(", ")
            );
        }
    }

    /// A result that is only a sentence (or, in JSON, `{"ok": …}`).
    pub(crate) fn done(&self, message: &str) {
        if self.json {
            println!("{}", json!({ "ok": message }));
        } else {
            println!("{message}");
        }
    }

    /// Any JSON value, or its text for people.
    pub(crate) fn value(&self, value: serde_json::Value, text: &str) {
        if self.json {
            println!("{value}");
        } else {
            println!("{text}");
        }
    }

    pub(crate) fn failure(&self, failure: &Failure) {
        let (code, message, violations) = match failure {
            Failure::Call(Error::InvalidArgument { message, violations }) => (
                "INVALID_ARGUMENT".to_owned(),
                message.clone(),
                violations
                    .iter()
                    .map(|v| (v.field.clone(), v.description.clone()))
                    .collect(),
            ),
            Failure::Call(error) => (
                shop_telemetry::grpc::code_name(error.code() as i64).to_owned(),
                error.to_string(),
                Vec::new(),
            ),
            Failure::Other(error) => ("ERROR".to_owned(), format!("{error:#}"), Vec::new()),
        };
        if self.json {
            let violations: Vec<_> = violations
                .iter()
                .map(|(field, description)| json!({"field": field, "description": description}))
                .collect();
            println!(
                "{}",
                json!({"error": {"code": code, "message": message, "violations": violations}})
            );
            return;
        }
        eprintln!("error: {message}");
        for (field, description) in violations {
            eprintln!("  {field}: {description}");
        }
    }
}
