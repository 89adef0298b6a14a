//! The README's table of settings against what the binaries read: every
//! variable either service reads is listed, nothing listed is unread, and
//! each listed default is the one the binary uses.

use std::collections::{BTreeMap, BTreeSet};

use clap::Command;
use order_service::OrderService;
use user_service::UserService;

/// Variable → default (empty when it has none), as `command` declares them.
fn declared(command: &Command) -> BTreeMap<String, String> {
    command
        .get_arguments()
        .filter_map(|arg| {
            let variable = arg.get_env()?.to_string_lossy().into_owned();
            let default = arg
                .get_default_values()
                .iter()
                .map(|value| value.to_string_lossy().into_owned())
                .collect::<Vec<_>>()
                .join(",");
            Some((variable, default))
        })
        .collect()
}

/// One row of the README's table.
#[derive(Debug)]
struct Row {
    variables: Vec<String>,
    default: String,
    read_by: String,
}

fn readme_rows() -> Vec<Row> {
    let readme = std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/../README.md")).unwrap();
    let start = readme
        .find("<!-- settings:")
        .expect("the settings table's opening marker");
    let end = readme
        .find("<!-- end of settings -->")
        .expect("its closing marker");
    readme[start..end]
        .lines()
        .filter(|line| line.starts_with("| `"))
        .map(|line| {
            let cells: Vec<&str> = line.trim_matches('|').split(" | ").map(str::trim).collect();
            Row {
                variables: cells[0]
                    .split('`')
                    .skip(1)
                    .step_by(2)
                    .map(str::to_owned)
                    .collect(),
                default: cells[1].to_owned(),
                read_by: cells[2].to_owned(),
            }
        })
        .collect()
}

#[test]
fn the_readme_lists_every_setting_the_services_read_with_its_default() {
    let user = declared(&shop_host::cli::command::<UserService>());
    let order = declared(&shop_host::cli::command::<OrderService>());
    let rows = readme_rows();

    let listed: BTreeSet<&str> = rows
        .iter()
        .flat_map(|row| row.variables.iter().map(String::as_str))
        .collect();
    let read: BTreeSet<&str> = user.keys().chain(order.keys()).map(String::as_str).collect();
    assert_eq!(listed, read, "the README's table and the binaries disagree");

    for row in &rows {
        for variable in &row.variables {
            let readers: Vec<(&str, &BTreeMap<String, String>)> = [("user", &user), ("order", &order)]
                .into_iter()
                .filter(|(_, declared)| declared.contains_key(variable))
                .collect();
            let expected_reader = match readers.as_slice() {
                [_, _] => "both",
                [(name, _)] => name,
                _ => unreachable!(),
            };
            assert_eq!(row.read_by, expected_reader, "who reads {variable}");
            for (name, declared) in readers {
                let default = &declared[variable];
                if default.is_empty() {
                    assert_eq!(row.default, "unset", "{variable} has no default");
                } else {
                    assert!(
                        row.default.contains(&format!("`{default}`")),
                        "the README gives {variable} the default {:?}, the {name} service uses {default}",
                        row.default
                    );
                }
            }
        }
    }
}
