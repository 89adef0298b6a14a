//! Users and orders as JSON values and table rows.

use serde_json::{Value, json};
use shop_client::{Order, OrderStatus, User};

fn time(timestamp: Option<&shop_contracts::prost_types::Timestamp>) -> String {
    timestamp
        .and_then(|ts| chrono::DateTime::from_timestamp(ts.seconds, u32::try_from(ts.nanos).unwrap_or(0)))
        .map(|time| time.to_rfc3339_opts(chrono::SecondsFormat::Millis, true))
        .unwrap_or_default()
}

fn status(order: &Order) -> &'static str {
    match OrderStatus::try_from(order.status) {
        Ok(OrderStatus::Pending) => "PENDING",
        Ok(OrderStatus::Cancelled) => "CANCELLED",
        _ => "UNSPECIFIED",
    }
}

pub(crate) fn user_json(user: &User) -> Value {
    json!({
        "id": user.id,
        "email": user.email,
        "name": user.name,
        "version": user.version,
        "created_at": time(user.created_at.as_ref()),
        "updated_at": time(user.updated_at.as_ref()),
    })
}

pub(crate) fn order_json(order: &Order) -> Value {
    json!({
        "id": order.id,
        "user_id": order.user_id,
        "status": status(order),
        "version": order.version,
        "items": order.items.iter().map(|item| json!({"product_id": item.product_id, "quantity": item.quantity})).collect::<Vec<_>>(),
        "created_at": time(order.created_at.as_ref()),
        "updated_at": time(order.updated_at.as_ref()),
    })
}

pub(crate) const USER_HEADER: [&str; 5] = ["ID", "EMAIL", "NAME", "VERSION", "UPDATED"];

pub(crate) fn user_row(user: &User) -> Vec<String> {
    vec![
        user.id.clone(),
        user.email.clone(),
        user.name.clone(),
        user.version.to_string(),
        time(user.updated_at.as_ref()),
    ]
}

pub(crate) const ORDER_HEADER: [&str; 6] = ["ID", "USER", "STATUS", "VERSION", "ITEMS", "UPDATED"];

pub(crate) fn order_row(order: &Order) -> Vec<String> {
    let items: Vec<String> = order
        .items
        .iter()
        .map(|item| format!("{}×{}", item.product_id, item.quantity))
        .collect();
    vec![
        order.id.clone(),
        order.user_id.clone(),
        status(order).to_owned(),
        order.version.to_string(),
        items.join(", "),
        time(order.updated_at.as_ref()),
    ]
}
